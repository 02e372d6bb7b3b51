"""FLUX.2 [klein] (4B, 9B, their -base variants, ``tiny-random-klein[-base]``) as an
:class:`ultragen.family.ModelFamily`.

Latent grid: the patchified, BatchNorm-normalised ``AutoencoderKLFlux2`` latent, (B, 4 * latent_channels, H/16,
W/16) (128 channels for klein): one latent pixel is one token, so packing is a flatten (``ultragen.flux2.latents``).
Text: stacked Qwen3 hidden states (``ultragen.flux2.text``). Stage A is the stock ``Flux2KleinPipeline``; the hires
pass runs the stock klein schedule (resolution-dependent empirical shift) and, for the base models, classifier-free
guidance with both branches through :class:`ultragen.flux2.HierFlux2Transformer` (they share the cached guide keys
and values: the guide attends only to itself, so they do not depend on the prompt).

Defaults (:func:`klein_defaults`, from ``ultragen.flux2.schedule``): distilled 4 guide + 4 hires steps without CFG;
base 50 + 28 with CFG 4. Warm start is off (skip 0: the hires stage runs its whole schedule from noise, reading the
guide through attention): the authors switch it off for klein, and with 4 distilled steps a skipped step is a quarter
of the schedule. ``--warm-start-skip K`` turns it on.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from ultragen.family import ModelFamily, ModelInfo, Prompt

TINY_BASE = "tiny-random-klein-base"
_FLUX2_ONLY = re.compile(r"(^|\.)(attn\.to_qkv_mlp_proj|ff(_context)?\.linear_(in|out)|single_transformer_blocks\.\d+"
                         r"\.attn\.to_out)$")


def klein_defaults(is_distilled: bool, max_text_tokens: int | None = None):
    """The :class:`ultragen.pipeline.config.ModelDefaults` of a klein variant (``ultragen.flux2.schedule``'s steps
    and CFG; no warm start; 512 text tokens, capped by the tokenizer)."""
    from ultragen.flux2.schedule import klein_variant, schedule_defaults
    from ultragen.flux2.text import TEXT_TOKENS
    from ultragen.pipeline.config import ModelDefaults, ModelVariant, capped_text

    s = schedule_defaults(is_distilled)
    variant = {"distilled": ModelVariant.FLUX2_KLEIN, "base": ModelVariant.FLUX2_KLEIN_BASE}[
        klein_variant(is_distilled).value]
    base = ModelDefaults(variant, s.hires_steps, s.guide_steps, 0 if not s.warm_start else 1, None, None, TEXT_TOKENS,
                         true_cfg_scale=s.cfg_scale, guide_true_cfg_scale=s.cfg_scale, shift=None)
    return capped_text(base, max_text_tokens)


def _hidden_layers(text_encoder) -> tuple[int, ...]:
    """The Qwen3 layers klein stacks: (9, 18, 27) for the real encoders; the tiny encoder's (1, 2, 3)."""
    from ultragen.flux2.text import HIDDEN_LAYERS
    from ultragen.flux2.tiny import TINY_HIDDEN_LAYERS

    return HIDDEN_LAYERS if text_encoder.config.num_hidden_layers >= max(HIDDEN_LAYERS) else TINY_HIDDEN_LAYERS


def _bn(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ultragen.flux2.latents import _bn_stats

    return _bn_stats(vae, like)


def vae_to_grid(vae, z: torch.Tensor) -> torch.Tensor:
    """(B, latent_channels, H/8, W/8) VAE latent -> (B, 4 * latent_channels, H/16, W/16) latent grid."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    patches = Flux2KleinPipeline._patchify_latents(z)
    mean, std = _bn(vae, patches)
    return (patches - mean) / std


def grid_to_vae(grid: torch.Tensor, vae) -> torch.Tensor:
    """The inverse of :func:`vae_to_grid` (what ``vae.decode`` takes, as the stock pipeline computes it)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    mean, std = _bn(vae, grid)
    return Flux2KleinPipeline._unpatchify_latents(grid * std + mean)


class Flux2Family(ModelFamily):
    name = "flux2"
    title = "FLUX.2 [klein]"
    pipeline_classes = ("Flux2KleinPipeline",)
    tiny_models = ("tiny-random-klein", TINY_BASE)
    latent_px = 16

    # --- models --------------------------------------------------------------------------------------------------
    def load_pipeline(self, model: str, dtype: torch.dtype):
        if model in self.tiny_models:
            from ultragen.flux2.tiny import tiny_klein_pipeline

            return tiny_klein_pipeline(dtype, is_distilled=model != TINY_BASE)
        from diffusers import Flux2KleinPipeline

        from ultragen.pipeline.loading import from_pretrained

        return from_pretrained(Flux2KleinPipeline, model, dtype=dtype)

    def load_vae(self, model: str, dtype: torch.dtype):
        if model in self.tiny_models:
            from ultragen.flux2.tiny import tiny_klein_vae

            vae = tiny_klein_vae()
            return vae if dtype == torch.float32 else torch.nn.Module.to(vae, dtype)
        from diffusers import AutoencoderKLFlux2

        from ultragen.pipeline.loading import from_pretrained

        return from_pretrained(AutoencoderKLFlux2, model, subfolder="vae", dtype=dtype)

    def inspect(self, model: str, root: Path | None) -> ModelInfo:
        if root is None:
            from ultragen.flux2 import tiny

            transformer = tiny.tiny_klein_transformer().config
            defaults = klein_defaults(model != TINY_BASE, tiny.TINY_TEXT_TOKENS)
            return ModelInfo(self.name, transformer.num_attention_heads, transformer.attention_head_dim, defaults)
        from ultragen.pipeline.loading import read_json

        index = read_json(model, root / "model_index.json")
        transformer = read_json(model, root / "transformer" / "config.json")
        tokenizer = root / "tokenizer" / "tokenizer_config.json"
        max_text = read_json(model, tokenizer).get("model_max_length") if tokenizer.is_file() else None
        max_text = int(max_text) if isinstance(max_text, (int, float)) and max_text < 10**6 else None
        defaults = klein_defaults(bool(index.get("is_distilled", False)), max_text)
        return ModelInfo(self.name, int(transformer["num_attention_heads"]), int(transformer["attention_head_dim"]),
                         defaults)

    def defaults(self, pipe):
        max_text = getattr(pipe.tokenizer, "model_max_length", None)
        return klein_defaults(bool(pipe.config.is_distilled), max_text if max_text and max_text < 10**6 else None)

    # --- stages --------------------------------------------------------------------------------------------------
    def _cfg(self, config) -> bool:
        return config.true_cfg_scale is not None or config.guide_true_cfg_scale is not None

    def encode(self, pipe, prompts, config, device) -> Prompt:
        from ultragen.flux2.text import encode_prompts

        dtype = pipe.transformer.dtype
        layers = _hidden_layers(pipe.text_encoder)

        def run(texts):
            return encode_prompts(pipe.text_encoder, pipe.tokenizer, texts, text_tokens=config.text_tokens,
                                  hidden_layers=layers, device=device, dtype=dtype).to(dtype)

        negative = run([config.negative_prompt] * len(prompts)) if self._cfg(config) else None
        return Prompt(run(prompts), None, negative)

    def stage_a(self, pipe, prompt: Prompt, config, generator, progress, on_step=None) -> torch.Tensor:
        height, width = config.guide_size_px

        def on_step_end(_pipe, i: int, _t, tensors: dict) -> dict:
            last = i + 1 == config.guide_steps
            on_step(i + 1, config.guide_steps, self.unpack(tensors["latents"], height, width) if last else None)
            return {}

        pipe.set_progress_bar_config(desc="guide", disable=not progress)
        cfg = config.guide_true_cfg_scale
        z = pipe(prompt_embeds=prompt.embeds, negative_prompt_embeds=prompt.negative if cfg else None,
                 height=height, width=width, num_inference_steps=config.guide_steps,
                 guidance_scale=cfg if cfg is not None else 1.0, generator=generator, output_type="latent",
                 max_sequence_length=config.text_tokens, text_encoder_out_layers=_hidden_layers(pipe.text_encoder),
                 callback_on_step_end=on_step_end if on_step is not None else None).images
        return vae_to_grid(pipe.vae, z.to(pipe.vae.dtype)).to(prompt.embeds.dtype)

    def hierarchical(self, transformer, *, backend="auto", ntk_factor=1.0, cache_guide=True, ff_chunk_tokens=None,
                     parallel=None):
        from ultragen.flux2 import HierFlux2Transformer

        if parallel is not None:
            raise ValueError("--parallel runs FLUX.1 models only so far; run FLUX.2 [klein] on one GPU (leave out "
                             "--parallel and torchrun)")
        # ff_chunk_tokens is FLUX.1's (HierFluxTransformer); klein's blocks run the feed-forward whole
        return HierFlux2Transformer(transformer, backend=backend, ntk_factor=ntk_factor, cache_guide=cache_guide)

    def hires_scheduler(self, pipe, config, layout, device):
        from ultragen.flux2.schedule import set_timesteps
        from ultragen.pipeline.schedule import hires_scheduler

        if config.shift is not None:  # an explicit static shift, as for FLUX.1
            return hires_scheduler(pipe.scheduler, config.steps, config.warm_start_skip, config.shift, device)
        if not 0 <= config.warm_start_skip < config.steps:
            raise ValueError(f"warm_start_skip={config.warm_start_skip} must be in [0, steps={config.steps})")
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        set_timesteps(scheduler, config.steps, layout.hires_tokens, device)  # the stock shift for the hires canvas
        scheduler.set_begin_index(config.warm_start_skip)
        return scheduler

    def velocity(self, hier, x, prompt: Prompt, sigma, plan, guide, config) -> torch.Tensor:
        v = hier(x, prompt.embeds, sigma, plan, guide=guide)
        if config.true_cfg_scale is None or prompt.negative is None:
            return v
        v_neg = hier(x, prompt.negative, sigma, plan, guide=guide)  # the guide cache is reused: same guide, plan
        return v_neg + config.true_cfg_scale * (v - v_neg)  # Flux2KleinPipeline's CFG

    # --- latents -------------------------------------------------------------------------------------------------
    def pack(self, latent):
        from ultragen.flux2.latents import pack

        return pack(latent)

    def unpack(self, tokens, height_px, width_px):
        from ultragen.flux2.latents import unpack

        return unpack(tokens, height_px // 16, width_px // 16)

    def decode(self, vae, latent, tile_px, progress):
        from ultragen.pipeline.decode import decode_latents

        return decode_latents(vae, latent, tile_px, progress, to_vae=grid_to_vae)

    # --- LoRAs ---------------------------------------------------------------------------------------------------
    def claims_lora(self, modules: set[str]) -> bool:
        from ultragen.flux2.lora import _is_authors_set

        return any(_FLUX2_ONLY.search(m) for m in modules) or _is_authors_set(modules)

    def read_lora_metadata(self, path):
        from ultragen.flux2.lora import read_lora_metadata

        return read_lora_metadata(path)

    def load_guide_lora(self, transformer, path, expected, allow_mismatch=False):
        from ultragen.flux2.lora import load_guide_lora, read_lora_metadata

        meta = read_lora_metadata(path)
        if expected is not None and meta.extra.get("source") == "authors":
            expected = replace(expected, base_model=meta.base_model)  # their file names no model of ours
        return load_guide_lora(transformer, path, expected=expected, allow_mismatch=allow_mismatch)

    def add_guide_lora(self, transformer, rank, alpha, targets=None):
        from ultragen.flux2.lora import LoraTargets, add_guide_lora

        add_guide_lora(transformer, rank, alpha, targets or LoraTargets.WIDE)

    def save_guide_lora(self, transformer, path, metadata):
        from ultragen.flux2.lora import save_guide_lora

        return save_guide_lora(transformer, path, metadata)

    def check_style_lora_file(self, spec):
        from ultragen.flux.style_lora import convert_klein_lora
        from ultragen.style_lora import read_style_lora

        lora = read_style_lora(spec)
        convert_klein_lora(lora)  # the shapes are checked against the model when it is loaded
        return lora

    def load_style_lora(self, pipe, lora, adapter_name):
        from ultragen.flux.style_lora import load_klein_style_lora

        return load_klein_style_lora(pipe, lora, adapter_name)

    # --- training --------------------------------------------------------------------------------------------------
    def load_transformer(self, model, dtype):
        if model in self.tiny_models:
            from ultragen.flux2.tiny import tiny_klein_transformer

            transformer = tiny_klein_transformer()
            return transformer if dtype == torch.float32 else transformer.to(dtype)
        from diffusers import Flux2Transformer2DModel

        from ultragen.pipeline.loading import from_pretrained

        return from_pretrained(Flux2Transformer2DModel, model, subfolder="transformer", dtype=dtype)

    def with_transformer(self, model, transformer):
        from diffusers import Flux2KleinPipeline

        if model in self.tiny_models:
            from ultragen.flux2.tiny import tiny_klein_pipeline

            pipe = tiny_klein_pipeline(transformer.dtype, is_distilled=model != TINY_BASE)
            return Flux2KleinPipeline(**{**pipe.components, "transformer": transformer},
                                      is_distilled=pipe.config.is_distilled)
        from ultragen.pipeline.loading import from_pretrained

        return from_pretrained(Flux2KleinPipeline, model, dtype=transformer.dtype, transformer=transformer)

    def text_token_limit(self, pipe):
        from ultragen.flux2.text import TEXT_TOKENS

        limit = getattr(pipe.tokenizer, "model_max_length", TEXT_TOKENS)
        return limit if limit < 10**6 else TEXT_TOKENS

    def encode_text(self, pipe, captions, text_tokens):
        from ultragen.flux2.text import encode_prompts

        return Prompt(encode_prompts(pipe.text_encoder, pipe.tokenizer, captions, text_tokens=text_tokens,
                                     hidden_layers=_hidden_layers(pipe.text_encoder),
                                     device=pipe.transformer.device, dtype=pipe.transformer.dtype))

    def encode_images(self, pipe, images):
        vae = pipe.vae
        return vae_to_grid(vae, vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode())

    def sample_images(self, pipe, prompt, size_px, steps, guidance, generator, text_tokens):
        # no guidance embedding: the model's own CFG (klein-base 4, the distilled models none) and steps (50 / 4)
        defaults = self.defaults(pipe)
        steps, guidance = steps or defaults.guide_steps, defaults.guide_true_cfg_scale or 0.0
        layers = _hidden_layers(pipe.text_encoder)
        return pipe(prompt=prompt, height=size_px, width=size_px, num_inference_steps=steps, guidance_scale=guidance,
                    generator=generator, max_sequence_length=text_tokens, text_encoder_out_layers=layers).images

    def train_velocity(self, hier, x, prompt, t, plan, guide, guidance):
        return hier(x, prompt.embeds, t, plan, guide=guide, guidance=guidance)

    # --- benchmarks ----------------------------------------------------------------------------------------------
    def random_transformer(self, config, device, dtype, seed=0):
        from diffusers import Flux2Transformer2DModel

        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Flux2Transformer2DModel(**config)
        finally:
            torch.set_default_dtype(previous)
        return model.eval().requires_grad_(False)

    def random_pipeline(self, parts, device, dtype):
        """``parts``: transformer, text_encoder (Qwen3Config arguments), vae (AutoencoderKLFlux2 arguments),
        text_tokens (the tokenizer's model_max_length). The tokenizer is tiny-random-klein's byte-level one (token
        ids index the real vocabulary's first rows); the scheduler is klein's (dynamic exponential shift)."""
        from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from ultragen.flux2.tiny import tiny_klein_scheduler, tiny_qwen_tokenizer

        tokenizer = tiny_qwen_tokenizer()
        tokenizer.model_max_length = parts["text_tokens"]
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                text_encoder = Qwen3ForCausalLM(Qwen3Config(**parts["text_encoder"],
                                                            pad_token_id=tokenizer.pad_token_id,
                                                            eos_token_id=tokenizer.eos_token_id))
                vae = AutoencoderKLFlux2(**parts["vae"])
        finally:
            torch.set_default_dtype(previous)
        return Flux2KleinPipeline(scheduler=tiny_klein_scheduler(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                                  tokenizer=tokenizer, is_distilled=parts.get("is_distilled", True),
                                  transformer=self.random_transformer(parts["transformer"], device, dtype))

    def random_step_inputs(self, model, layout, seed=0):
        cfg, device, dtype = model.config, model.device, model.dtype
        g = torch.Generator(device=device).manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=dtype)

        return {"hires": rand(1, layout.hires_tokens, cfg.in_channels),
                "guide": rand(1, layout.guide_tokens, cfg.in_channels) if layout.guide_tokens else None,
                "encoder_hidden_states": rand(1, layout.text_tokens, cfg.joint_attention_dim),
                "timestep": torch.full((1,), 0.8, device=device, dtype=dtype)}

    def hier_step(self, hier, inputs, plan):
        return hier(plan=plan, **inputs)

    def dense_step(self, model, inputs, layout):
        from ultragen.flux2.ids import raster_image_ids, text_ids

        rows, cols = layout.padded_grid
        return model(hidden_states=inputs["hires"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     timestep=inputs["timestep"], img_ids=raster_image_ids(rows, cols).to(model.device),
                     txt_ids=text_ids(layout.text_tokens).to(model.device), guidance=None).sample


FAMILY = Flux2Family()
