"""``UltraGenPipeline``: a prompt in, a high-resolution image out, in two stages, for any model family
(:mod:`ultragen.family`: FLUX.1, FLUX.2 [klein]).

Stage A: the family's stock diffusers pipeline generates the guide at ``layout.guide_height_px x guide_width_px``
(stock transformer, dense attention, any guide LoRA switched off). Stage B, once per cascade level: the guide latent
is upsampled, sharpened and re-noised to sigma_k (warm start; k = 0 starts from noise), and steps k..N-1 of the
family's N-step hires schedule run through its hierarchical transformer over the padded canvas with the guide in the
sequence. The result is cropped to the requested size in latent space; it is the next level's guide, or the output.

Latents here are either *packed* (B, tokens, C) as the transformer sees them (raster order, or window-first /
tile-first in stage B) or *unpacked* on the family's latent grid (B, C, H/lp, W/lp), lp = ``family.latent_px``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ultragen.family import Prompt, family_of_model, family_of_pipeline, tiny_family
from ultragen.flux.lora import ADAPTER_NAME
from ultragen.layout import HierLayout
from ultragen.pipeline.config import GenerationConfig, ModelDefaults
from ultragen.pipeline.decode import to_pil
from ultragen.pipeline.warm_start import warm_start_latent
from ultragen.policy import build_plan

log = logging.getLogger(__name__)
NO_LORA_WARNING = (
    "no guide LoRA loaded: the hires pass reads the guide only as far as the model generalises to it untrained. On "
    "the testbed a model that never saw guide tokens ignored it completely (4x count accuracy without and with a guide "
    "LoRA: README.md, Testbed). Train one with `ultragen train` and pass --lora.")


@dataclass
class UltraGenOutput:
    """``images``: PIL images (or a (B, 3, H, W) tensor in [0, 1] for ``output_type="pt"``, None for "latent").
    ``latents``: final unpacked latents (B, C, H/8, W/8); ``guide_latents``: stage A's (B, C, h/8, w/8).
    ``config``: the resolved settings; ``timings_s``: seconds per stage; ``warm_start_sigmas``: per cascade level,
    the noise level stage B re-noised its guide to, read from the scheduler it ran (``scheduler.sigmas[k]``)."""

    images: list | torch.Tensor | None
    latents: torch.Tensor
    guide_latents: torch.Tensor
    config: GenerationConfig
    timings_s: dict[str, float] = field(default_factory=dict)
    warm_start_sigmas: tuple[float, ...] = ()


@dataclass(frozen=True)
class StepEvent:
    """Progress inside :meth:`UltraGenPipeline.generate_latents`: ``done`` of ``total`` units of ``stage`` finished
    ("encode": 1 unit; "guide": stage-A steps; "hires" or "hires<level>" with a cascade: stage-B steps). The last
    "guide" event carries stage A's unpacked latents ``guide`` (B, C, h/8, w/8). A callback that raises stops the
    generation there, between two steps (the exception propagates; the guide cache is cleared)."""

    stage: str
    done: int
    total: int
    guide: torch.Tensor | None = None


StepCallback = Callable[[StepEvent], None]


def _crop(latents: torch.Tensor, layout: HierLayout, latent_px: int = 8) -> torch.Tensor:
    top, left, bottom, right = (v // latent_px for v in layout.crop_box_px())
    return latents[:, :, top:bottom, left:right]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)




class UltraGenPipeline:
    """Two-stage high-resolution generation with a FLUX.1 model (dev, schnell, ``tiny-random``) or a FLUX.2 [klein]
    model (4B, 9B, their -base variants, ``tiny-random-klein[-base]``).

    Wraps the family's diffusers pipeline (``FluxPipeline`` or ``Flux2KleinPipeline``; its text encoders,
    tokenizers, VAE, scheduler and transformer are used as they are; the transformer's weights are never modified
    unless style LoRAs are fused on request, a guide LoRA is added as a PEFT adapter). ``self.flux`` is that pipeline, ``self.family`` its
    :class:`ultragen.family.ModelFamily`. Style LoRAs (:meth:`load_style_lora`) are loaded by diffusers as further
    adapters and act as in stock diffusers.
    """

    def __init__(self, flux, model: str = ""):
        self.flux = flux
        self.family = family_of_pipeline(flux)
        self.model = model
        self.lora_metadata = None
        self.lora_record: dict | None = None  # the guide LoRA file: path, sha256, scale
        self.style_loras: tuple = ()  # ultragen.flux.style_lora.LoadedStyleLora, in loading order
        self._style_loads = 0  # adapter names are never reused (style1, style2, ...)
        self._warned_no_lora = False
        self._hier: tuple | None = None  # (settings, the family's hierarchical wrapper), reused across calls
        self.parallel = None  # ultragen.parallel.SequenceParallel: the hires pass over several processes (torchrun)
        self._fp8 = False
        # per cascade level, the sigma the last run's stage B re-noised its guide to, read from the scheduler it ran
        # (what a run record states; a closed formula would not notice if stage B used another)
        self.last_warm_start_sigmas: tuple[float, ...] = ()
        # per cascade level of the last run, the step cache's setting and its computed / skipped step counts
        self.last_step_cache: list[dict] = []

    @classmethod
    def from_pretrained(cls, model: str, dtype: torch.dtype | None = None,
                        torch_dtype: torch.dtype | None = None) -> UltraGenPipeline:
        """Load ``model``: a Hugging Face id (cache, then hub unless HF_HUB_OFFLINE=1), a local diffusers folder, or
        a tiny name (``tiny-random``, ``tiny-random-klein``, ``tiny-random-klein-base``), in ``dtype`` (default
        bfloat16, float32 for the tiny ones; ``torch_dtype`` is the older diffusers name). The family comes from the
        model's model_index.json. A missing model raises MissingWeightsError (a ValueError) saying what to
        download."""
        default = torch.float32 if tiny_family(model) is not None else torch.bfloat16
        return cls(family_of_model(model).load_pipeline(model, dtype or torch_dtype or default), model=model)

    def to(self, device: torch.device | str) -> UltraGenPipeline:
        self.flux.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.flux.transformer.device

    @property
    def defaults(self) -> ModelDefaults:
        """The defaults for this model's variant; text tokens capped by what its tokenizer allows."""
        return self.family.defaults(self.flux)

    def prepare_weights(self, config: GenerationConfig) -> None:
        """Quantize the transformer blocks to FP8 if ``config.fp8`` (once; before any LoRA is added)."""
        if config.fp8 == self._fp8:
            return
        if not config.fp8:
            raise ValueError("this pipeline's transformer is already FP8; load a fresh pipeline for bf16 weights")
        if self.lora_metadata is not None or any(not s.fused for s in self.style_loras):
            raise ValueError("fp8=True must quantize the transformer before any LoRA is added; call prepare_weights "
                             "(or generate once) before load_lora / load_style_lora (fused style LoRAs may come "
                             "first: load_style_lora(path, fuse=True))")
        from ultragen.flux.fp8 import quantize_blocks_fp8

        quantize_blocks_fp8(self.flux.transformer)
        self._fp8 = True

    def load_lora(self, path: str, config: GenerationConfig, allow_mismatch: bool = False):
        """Add the guide LoRA at ``path``; refused (ValueError) when it was trained under other settings."""
        from ultragen.family import check_lora_family
        from ultragen.style_lora import file_sha256

        check_lora_family(path, self.family, config.model or self.model)
        expected = config.lora_expectation(config.model or self.model)
        self.lora_metadata = self.family.load_guide_lora(self.flux.transformer, path, expected=expected,
                                                         allow_mismatch=allow_mismatch)
        self.lora_record = {"kind": "guide", "path": str(Path(path).resolve()), "sha256": file_sha256(path),
                            "scale": 1.0}
        self._activate_adapters()  # diffusers' add_adapter made the guide LoRA the only active adapter
        return self.lora_metadata

    def load_style_lora(self, path: str | os.PathLike, scale: float = 1.0, fuse: bool = False):
        """Add a style LoRA (any FLUX.1 format diffusers reads: diffusers/PEFT, kohya, XLabs, ...; .safetensors only)
        at ``scale``. It acts on every token stream in both stages, as it does in stock diffusers; the guide LoRA
        acts on top of it on the guide tokens only. Refused (ValueError naming the file) when it is not a
        safetensors file, is corrupt, or does not fit this model. Returns the loaded LoRA (file, SHA-256, adapter).

        ``fuse``: then merge it into the base weights (:meth:`fuse_style_loras`); with FP8, fuse before the first
        FP8 image (the weights must still be bf16)."""
        if fuse and self._fp8:
            raise ValueError(f"cannot fuse style LoRA {os.fspath(path)!r}: this pipeline's transformer is already FP8; "
                             f"load a fresh pipeline and fuse before the first fp8 image (ultragen generate "
                             f"--fp8 --fuse-style-loras does)")
        from ultragen.family import check_lora_family
        from ultragen.style_lora import StyleLoraSpec, read_style_lora

        lora = read_style_lora(StyleLoraSpec(os.fspath(path), scale))
        check_lora_family(path, self.family, self.model, kind="style LoRA")
        self._style_loads += 1
        loaded = self.family.load_style_lora(self.flux, lora, adapter_name=f"style{self._style_loads}")
        self.style_loras = (*self.style_loras, loaded)
        self._activate_adapters()
        if fuse:
            self.fuse_style_loras()
            loaded = self.style_loras[-1]
        return loaded

    def fuse_style_loras(self) -> None:
        """Merge every unfused style LoRA into the base weights (diffusers' ``fuse_lora`` at its scale) and delete
        its adapter: no extra matmuls per step, but no exact unload (reload the pipeline instead). The guide LoRA
        stays an adapter routed to the guide tokens. Quantize to FP8 after this, not before."""
        from ultragen.flux.style_lora import fuse_style_loras

        if self._fp8 and any(not s.fused for s in self.style_loras):
            raise ValueError("cannot fuse style LoRAs into FP8 weights; load a fresh pipeline and fuse before the "
                             "first fp8 image (ultragen generate --fp8 --fuse-style-loras does)")
        self._activate_adapters()  # the scales fuse_lora merges with
        self.style_loras = fuse_style_loras(self.flux, self.style_loras)
        self._activate_adapters()
        if self._hier is not None:  # the base weights changed in place: cached guide keys/values are stale
            self._hier[1].clear_guide_cache()

    def unload_style_loras(self) -> None:
        """Remove every style LoRA (their adapters are deleted; the guide LoRA stays): the base output comes back
        bit for bit. Refused for fused style LoRAs (merged into the weights): reload the pipeline."""
        fused = [s.file.spec.path for s in self.style_loras if s.fused]
        if fused:
            raise ValueError(f"style LoRA {fused[0]!r} is fused into the base weights and cannot be unloaded exactly; "
                             f"load the pipeline again (UltraGenPipeline.from_pretrained) for the base weights")
        if self.style_loras:
            self.flux.delete_adapters([s.adapter_name for s in self.style_loras])
        self.style_loras = ()
        self._activate_adapters()

    def lora_records(self) -> list[dict]:
        """Every LoRA file in use, for an image's record: kind ("guide" or "style"), path, SHA-256 and scale (and
        for a style LoRA, whether it was fused into the weights)."""
        styles = [s.record() for s in self.style_loras]
        return ([self.lora_record] if self.lora_record is not None else []) + styles

    def _activate_adapters(self, guide: bool = True) -> None:
        """Make exactly the style LoRAs (at their scales) and, with ``guide``, the guide LoRA active."""
        names = [s.adapter_name for s in self.style_loras if not s.fused]  # fused ones have no adapter left
        weights = [s.scale for s in self.style_loras if not s.fused]
        if guide and ADAPTER_NAME in getattr(self.flux.transformer, "peft_config", {}):
            names, weights = [*names, ADAPTER_NAME], [*weights, 1.0]
        if names:
            self.flux.set_adapters(names, weights)

    @contextlib.contextmanager
    def _guide_lora_off(self):
        """Stage A runs the stock model: the style LoRAs on, the guide LoRA off inside, restored after."""
        transformer = self.flux.transformer
        if ADAPTER_NAME not in getattr(transformer, "peft_config", {}):
            yield
            return
        styled = any("transformer" in s.components and not s.fused for s in self.style_loras)
        if styled:
            self._activate_adapters(guide=False)
        else:
            transformer.disable_adapters()
        try:
            yield
        finally:
            if styled:
                self._activate_adapters()
            else:
                transformer.enable_adapters()

    # --- the call --------------------------------------------------------------------------------------------------
    def resolve(self, config: GenerationConfig) -> GenerationConfig:
        """``config`` with this model's defaults filled in and the model name recorded."""
        if not config.model:
            config = replace(config, model=self.model)
        return config.resolved(self.defaults)

    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        *,
        config: GenerationConfig | None = None,
        output_type: str = "pil",
        progress: bool = True,
        **settings,
    ) -> UltraGenOutput:
        """Generate ``prompt`` at ``height`` x ``width`` px. Any GenerationConfig field can be passed as a keyword
        (``rho=4, warm_start_skip=10, guide_steps=28, backend="auto", ...``) or as ``config``.

        ``generator``: a seeded CPU generator (its ``initial_seed()`` is recorded); default: ``config.seed``.
        ``output_type``: "pil", "pt" or "latent" (skip decoding)."""
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; use 'pil', 'pt' or 'latent'")
        config = self.make_config(config, height, width, num_inference_steps, guidance_scale, generator, **settings)
        latents, guide, timings = self.generate_latents(prompt, config, generator, progress=progress)
        sigmas = self.last_warm_start_sigmas
        images = None
        if output_type != "latent":
            start = time.perf_counter()
            images = self.decode(latents, config.vae_tile_px, progress=progress)
            timings["decode"] = time.perf_counter() - start
            if output_type == "pil":
                images = to_pil(images)
        return UltraGenOutput(images, latents, guide, config, timings, sigmas)

    def make_config(self, config: GenerationConfig | None = None, height: int | None = None,
                    width: int | None = None, num_inference_steps: int | None = None,
                    guidance_scale: float | None = None, generator: torch.Generator | None = None,
                    **settings) -> GenerationConfig:
        """Merge a config, the diffusers-style arguments and keyword settings; resolve the model defaults."""
        given = {"height_px": height, "width_px": width, "steps": num_inference_steps, "guidance_scale": guidance_scale}
        unknown = sorted(set(settings) - {f.name for f in fields(GenerationConfig)})
        if unknown:
            raise ValueError(f"unknown settings {unknown}; GenerationConfig has {[f.name for f in fields(GenerationConfig)]}")
        given = {k: v for k, v in given.items() if v is not None} | settings
        if generator is not None:
            given["seed"] = generator.initial_seed()
        if config is None:
            if "height_px" not in given or "width_px" not in given:
                raise ValueError("pass height and width (pixels, multiples of 16) or a GenerationConfig")
            config = GenerationConfig(**given)
        elif given:
            config = replace(config, **given)
        return self.resolve(config)

    @torch.no_grad()  # also when called directly (``ultragen generate`` does): no autograd graph, the guide cache on
    def generate_latents(self, prompt: str | list[str], config: GenerationConfig,
                         generator: torch.Generator | None = None, progress: bool = True,
                         callback: StepCallback | None = None):
        """(final unpacked latents (B, C, H/8, W/8) cropped to the requested size, guide latents, timings_s).
        ``callback`` is called with a :class:`StepEvent` after each unit of work (it may raise to stop).

        Sets :attr:`last_warm_start_sigmas` to the sigma each cascade level's stage B started from."""
        if not config.is_resolved():
            config = self.resolve(config)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError(f"prompt={prompt!r} is empty; pass a description of the image")
        generator = generator or torch.Generator("cpu").manual_seed(config.seed)
        self.prepare_weights(config)
        if ADAPTER_NAME not in getattr(self.flux.transformer, "peft_config", {}) and not self._warned_no_lora:
            log.warning(NO_LORA_WARNING)
            self._warned_no_lora = True  # once per pipeline, not once per prompt
        hier = self._hierarchical(config)  # before stage A: with compile_blocks it compiles stage A's blocks too
        timings: dict[str, float] = {}
        clock = _Clock(self.device, timings)
        with clock("encode"):
            text = self._encode(prompts, config)
        if callback is not None:
            callback(StepEvent("encode", 1, 1))
        with clock("guide"):
            guide = self._stage_a(text, config, generator, progress, callback)
        if self.parallel is not None:  # every rank continues from rank 0's prompt and guide, bit for bit
            embeds, pooled, guide = self.parallel.same_everywhere(text.embeds, text.pooled, guide)
            text = replace(text, embeds=embeds, pooled=pooled)
        x, sigmas = guide, []
        self.last_warm_start_sigmas = ()
        self.last_step_cache = []
        for level, layout in enumerate(config.layouts()):
            stage = f"hires{level}" if config.cascade_levels > 1 else "hires"
            with clock(stage):
                x, sigma = self._stage_b(hier, x, layout, text, config, generator, progress, callback, stage)
            sigmas.append(sigma)
        self.last_warm_start_sigmas = tuple(sigmas)
        return x, guide, timings

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile_px: int | None = None, progress: bool = True) -> torch.Tensor:
        """Unpacked latents -> (B, 3, H, W) float32 in [0, 1], tiled VAE decode."""
        return self.family.decode(self.flux.vae, latents, tile_px, progress)

    # --- stages ----------------------------------------------------------------------------------------------------
    def _hierarchical(self, config: GenerationConfig):
        """The hierarchical wrapper for these settings; kept across calls so compiled blocks are reused."""
        key = (config.backend, config.ntk_factor, config.compile_blocks, config.ff_chunk_tokens, config.cache_guide,
               self.parallel)
        if self._hier is None or self._hier[0] != key:
            hier = self.family.hierarchical(self.flux.transformer, backend=config.backend,
                                            ntk_factor=config.ntk_factor, cache_guide=config.cache_guide,
                                            ff_chunk_tokens=config.ff_chunk_tokens, parallel=self.parallel)
            if config.compile_blocks:
                hier.compile_blocks()
                # stage A runs the stock blocks through diffusers: compile them too (regional, in place; the
                # hierarchical pass calls the blocks' modules, not their compiled forward)
                self.flux.transformer.compile_repeated_blocks(dynamic=False)
            self._hier = (key, hier)
        return self._hier[1]

    def _encode(self, prompts: list[str], config: GenerationConfig) -> Prompt:
        encoders = [module for name, module in self.flux.components.items()
                    if name.startswith("text_encoder") and module is not None]
        if config.offload_text_encoders:
            for encoder in encoders:
                encoder.to(self.device)
        prompt = self.family.encode(self.flux, prompts, config, self.device)
        if config.offload_text_encoders:
            for encoder in encoders:
                encoder.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return prompt

    def _stage_a(self, text: Prompt, config: GenerationConfig, generator, progress: bool,
                 callback: StepCallback | None = None) -> torch.Tensor:
        """The guide: the family's stock pipeline at the guide size, the guide LoRA off. Returns the clean latent
        grid (B, C, h/lp, w/lp)."""
        on_step = None
        if callback is not None:
            def on_step(done: int, total: int, latent) -> None:
                callback(StepEvent("guide", done, total, latent))
        with self._guide_lora_off():
            return self.family.stage_a(self.flux, text, config, generator, progress, on_step)

    def _stage_b(self, hier, guide: torch.Tensor, layout: HierLayout, text: Prompt,
                 config: GenerationConfig, generator, progress: bool, callback: StepCallback | None = None,
                 stage: str = "hires") -> tuple[torch.Tensor, float]:
        """One hierarchical pass: unpacked clean guide (B, C, gh*r, gw*r) (r latent pixels per token side) ->
        (unpacked clean latent of the requested size (B, C, H/lp, W/lp), the sigma the warm start re-noised the guide
        to)."""
        family = self.family
        per_token = 16 // family.latent_px  # latent pixels per token side (FLUX.1: 2, FLUX.2: 1)
        expected = (layout.guide_image_grid[0] * per_token, layout.guide_image_grid[1] * per_token)
        if guide.ndim != 4 or tuple(guide.shape[-2:]) != expected:
            raise ValueError(f"guide latent of shape {tuple(guide.shape)} does not fit the layout: it must be "
                             f"(B, C, {expected[0]}, {expected[1]}) for {layout.width_px}x{layout.height_px} px at "
                             f"rho {layout.rho}; pass the guide stage A made for these settings")
        device, batch, channels = self.device, guide.shape[0], guide.shape[1]
        canvas = (layout.padded_grid[0] * per_token, layout.padded_grid[1] * per_token)
        scheduler = family.hires_scheduler(self.flux, config, layout, device)
        sigma = float(scheduler.sigmas[config.warm_start_skip])
        noise = randn_tensor((batch, channels, *canvas), generator=generator, device=device, dtype=torch.float32)
        start = warm_start_latent(guide.float(), canvas, noise, sigma, config.sharpen_strength,
                                  config.sharpen_sigma_latent_px)
        x = layout.hires_to_sequence(family.pack(start.to(guide.dtype)))  # (B, hires_tokens, C) window-first
        g = layout.guide_to_sequence(layout.pad_guide(family.pack(guide)))  # (B, guide_tokens, C) tile-first
        plan = build_plan(layout, config.policy)
        timesteps = scheduler.timesteps[config.warm_start_skip :]
        step_cache = hier.set_step_cache(config.step_cache)  # a fresh state for each image and cascade level
        try:
            for i, t in enumerate(tqdm(timesteps, desc=f"hires {layout.width_px}x{layout.height_px}",
                                       disable=not progress)):
                sigma_t = (t / 1000).expand(batch).to(x.dtype)
                velocity = family.velocity(hier, x, text, sigma_t, plan, g, config)
                x = scheduler.step(velocity, t, x, return_dict=False)[0]
                if callback is not None:
                    callback(StepEvent(stage, i + 1, len(timesteps)))
        finally:
            hier.clear_guide_cache()
            self.last_step_cache.append(step_cache.stats())
            step_cache.reset()  # frees its residuals
        raster = layout.hires_to_raster(x)
        latent = family.unpack(raster, layout.padded_height_px, layout.padded_width_px)
        return _crop(latent, layout, family.latent_px), sigma


class _Clock:
    """``with clock("name"):`` adds the block's wall time (device synchronised) to ``timings[name]``."""

    def __init__(self, device: torch.device, timings: dict[str, float]):
        self.device, self.timings = device, timings

    @contextlib.contextmanager
    def __call__(self, name: str):
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

