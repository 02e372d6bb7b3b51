"""Every setting of one generation in one frozen value, validated in one place, recorded with every output.

Fields left ``None`` mean "the model's default" (:class:`ModelDefaults`, chosen by the loaded model's family) and are
filled by :meth:`GenerationConfig.resolved`; the resolved config is what the outputs record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from pathlib import Path

from ultragen.attention import parse_backend
from ultragen.checks import check_float, check_int
from ultragen.layout import HierLayout, make_layout
from ultragen.policy import get_policy

MAX_TEXT_TOKENS = 512  # FLUX.1's T5 context (diffusers' FluxPipeline refuses more); FLUX.2 klein's prompt length
MAX_CASCADE_LEVELS = 3  # 3 hierarchical passes at rho 4 is 64x the pixels of the guide: already absurd


class ModelVariant(str, Enum):
    """Which variant of a model family is loaded; it decides the defaults (the family itself is
    :class:`ultragen.family.ModelFamily`)."""

    FLUX1_DEV = "flux1-dev"  # guidance-distilled: a guidance embedding, ~28 steps
    FLUX1_SCHNELL = "flux1-schnell"  # timestep-distilled: no guidance embedding, 4 steps
    FLUX2_KLEIN = "flux2-klein"  # klein-4B / -9B: step-distilled, 4 steps, no CFG, no guidance embedding
    FLUX2_KLEIN_BASE = "flux2-klein-base"  # klein-base-4B / -9B: CFG against a negative prompt


ModelFamily = ModelVariant  # the former name of this enum (FLUX.1 was the only family)


@dataclass(frozen=True)
class ModelDefaults:
    """The values a ``None`` field of :class:`GenerationConfig` takes for one model family."""

    family: ModelVariant  # the variant (the field keeps its first name: records call it model_family)
    steps: int
    guide_steps: int
    warm_start_skip: int
    guidance_scale: float | None  # None: the model has no guidance embedding
    guide_guidance_scale: float | None
    text_tokens: int
    true_cfg_scale: float | None = None  # classifier-free guidance of the hires pass; None: no CFG
    guide_true_cfg_scale: float | None = None  # the same for stage A
    shift: float | None = None  # static hires shift; None: the family's own schedule (FLUX.1 fills it in)


# FLUX.1-dev: the authors' paper settings (research/authors_repo.md section 5.5): a 28-step guide at guidance 3.5,
# a 28-step hires schedule of which the first 10 steps are skipped (warm start at sigma 0.84375 with shift 3),
# guidance 4.5 in the hires pass.
# FLUX.1-schnell: distilled for 4 steps from noise with shift 1, so the 4-step grid is sigma 1, .75, .5, .25.
# Skipping 1 step starts the hires pass at sigma 0.75, the grid point nearest below dev's 0.84: enough noise
# left for 3 steps to re-synthesise high-frequency detail over the blurry upsampled guide; skipping 2 (sigma 0.5)
# leaves 2 steps and keeps the upsampling blur. Untuned: the testbed is where such defaults get measured.
FAMILY_DEFAULTS: dict[ModelFamily, ModelDefaults] = {
    ModelFamily.FLUX1_DEV: ModelDefaults(ModelFamily.FLUX1_DEV, 28, 28, 10, 4.5, 3.5, 512),
    ModelFamily.FLUX1_SCHNELL: ModelDefaults(ModelFamily.FLUX1_SCHNELL, 4, 4, 1, None, None, 256),
    # FLUX.2 [klein]'s variants: built from ultragen.flux2.schedule by ultragen.flux2.family (klein_defaults)
}

def model_defaults(guidance_embeds: bool, max_text_tokens: int | None) -> ModelDefaults:
    """The defaults of a FLUX.1 model from its transformer's ``guidance_embeds`` and its T5 tokenizer's
    ``model_max_length`` (text tokens: whole 128-token blocks, at most what the tokenizer allows)."""
    base = FAMILY_DEFAULTS[ModelFamily.FLUX1_DEV if guidance_embeds else ModelFamily.FLUX1_SCHNELL]
    return capped_text(base, max_text_tokens)


def capped_text(base: ModelDefaults, max_text_tokens: int | None) -> ModelDefaults:
    """``base`` with text tokens in whole 128-token blocks, at most what the tokenizer allows."""
    limit = base.text_tokens if max_text_tokens is None else min(base.text_tokens, max_text_tokens)
    return replace(base, text_tokens=max(128, limit // 128 * 128))


_DEFAULTED = ("steps", "guide_steps", "warm_start_skip", "guidance_scale", "guide_guidance_scale", "text_tokens",
              "true_cfg_scale", "guide_true_cfg_scale", "shift")


@dataclass(frozen=True)
class GenerationConfig:
    """One generation: the size, the seed and every knob of both stages. Invalid values raise ValueError here.

    Sizes are the requested image in pixels (multiples of 16); the canvas may be padded inside and is cropped back.
    ``steps`` is N, the length of the hires schedule; the hires pass runs steps ``warm_start_skip`` (k) .. N-1,
    starting from the upsampled, sharpened guide re-noised to that schedule's sigma at index k.
    ``cascade_levels`` hierarchical passes are chained: each one's output is the next one's guide.
    """

    height_px: int
    width_px: int
    model: str = ""
    seed: int = 0
    steps: int | None = None
    guide_steps: int | None = None
    warm_start_skip: int | None = None
    guidance_scale: float | None = None
    guide_guidance_scale: float | None = None
    # classifier-free guidance (FLUX.2 klein-base): the velocity of the prompt against that of ``negative_prompt``,
    # both through the hierarchical transformer with the same cached guide; None: the model's default (none for
    # distilled models, which refuse it)
    true_cfg_scale: float | None = None
    guide_true_cfg_scale: float | None = None
    negative_prompt: str = ""
    rho: int = 4
    window_tokens: int = 16
    block_tokens: int = 128  # attention block (and guide tile) size in tokens
    policy: str = "default"
    backend: str = "auto"
    # static shift of the hires schedule; None: the model's (FLUX.1: its scheduler's ``shift``; FLUX.2: the stock
    # resolution-dependent shift of the hires image, diffusers' compute_empirical_mu)
    shift: float | None = None
    guide_dynamic_shift: bool = True  # stage A as the stock FluxPipeline does it (resolution-dependent mu)
    sharpen_strength: float = 0.5  # unsharp mask x + s * (x - blur(x)) on the upsampled guide latent
    sharpen_sigma_latent_px: float = 1.0  # blur sigma in latent pixels (8 image px each)
    ntk_factor: float = 1.0
    guide_offset_tokens: float | None = None  # guide token (m, n) sits at rho*(m, n) + this; None: (rho - 1) / 2
    text_tokens: int | None = None
    cascade_levels: int = 1
    lora_path: str | None = None
    vae_tile_px: int | None = None  # None: the VAE's own tile size (FLUX.1: 1024 px)
    offload_text_encoders: bool = False
    # the guide's per-layer keys/values computed once per image (when the policy keeps the guide to itself); costs
    # their memory: 2.8 GB measured at 4K, about 11.5 GB estimated at 8K; off: every step recomputes them (~8 % slower)
    cache_guide: bool = True
    # step cache of the hires pass (ultragen.step_cache): "off", "fbcache" or "fbcache:<threshold>"; off until the
    # testbed eval has measured a setting that keeps count and position accuracy within 2 points (docs/design.md)
    step_cache: str = "off"
    compile_blocks: bool = False  # torch.compile the hierarchical blocks (one compile per resolution)
    fp8: bool = False  # FP8 weights and activations in the transformer blocks (CUDA, compute capability 8.9+)
    # feed-forward over token chunks of this size; None: off. On an H100 at 8K (eager) it cost no time, saved 1.5 GB
    # and is what lets FP8 run there at all (unchunked FP8 ran out of memory); streams of <= 16,384 tokens stay whole.
    # Compiled blocks run the feed-forward whole (compiled FP8 at 8K: 39.2 GB unchunked; see HierFluxTransformer)
    ff_chunk_tokens: int | None = 16384

    def __post_init__(self) -> None:
        _validate(self)

    # --- derived ------------------------------------------------------------------------------------------------
    def layouts(self) -> list[HierLayout]:
        """Geometry of every hierarchical pass, coarsest first; the last one is the requested image.

        Pass i produces exactly the guide canvas of pass i+1 (its requested size, cropped from its padded canvas).
        """
        text = self.text_tokens if self.text_tokens is not None else MAX_TEXT_TOKENS
        chain = [make_layout(self.height_px, self.width_px, rho=self.rho, window_tokens=self.window_tokens,
                             block_tokens=self.block_tokens, text_tokens=text,
                             guide_offset_tokens=self.guide_offset_tokens)]
        for _ in range(self.cascade_levels - 1):
            outer = chain[0]
            chain.insert(0, make_layout(outer.guide_height_px, outer.guide_width_px, rho=self.rho,
                                        window_tokens=self.window_tokens, block_tokens=self.block_tokens,
                                        text_tokens=text,
                                        guide_offset_tokens=self.guide_offset_tokens))
        return chain

    @property
    def guide_size_px(self) -> tuple[int, int]:
        """(height, width) of the stage-A image."""
        first = self.layouts()[0]
        return first.guide_height_px, first.guide_width_px

    def lora_expectation(self, model: str | None = None):
        """The ``LoraMetadata`` a guide LoRA must have been trained under to be used by this run."""
        from ultragen.flux.lora import LoraMetadata
        from ultragen.pipeline.loading import normalise_model

        return LoraMetadata(base_model=normalise_model(model or self.model), policy=get_policy(self.policy).to_dict(),
                            rho=self.rho,
                            guide_offset_tokens=self.layouts()[-1].guide_offset_tokens, ntk_factor=self.ntk_factor,
                            window_tokens=self.window_tokens)

    def is_resolved(self) -> bool:
        """True once the model defaults are filled (guidance stays None for models without a guidance embedding)."""
        return None not in (self.steps, self.guide_steps, self.warm_start_skip, self.text_tokens)

    def resolved(self, defaults: ModelDefaults) -> GenerationConfig:
        """A copy with every ``None`` default filled from ``defaults``; checks settings that need the model."""
        if defaults.guidance_scale is None:
            for name in ("guidance_scale", "guide_guidance_scale"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}={getattr(self, name)} has no effect: this {defaults.family.value} model has no "
                        f"guidance embedding; leave it out"
                    )
        if defaults.true_cfg_scale is None:
            for name in ("true_cfg_scale", "guide_true_cfg_scale"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}={getattr(self, name)} has no effect: this {defaults.family.value} model runs without "
                        f"classifier-free guidance (a distilled model); leave it out, or use a base model "
                        f"(e.g. black-forest-labs/FLUX.2-klein-base-4B)"
                    )
            if self.negative_prompt:
                raise ValueError(f"negative_prompt={self.negative_prompt!r} has no effect: this "
                                 f"{defaults.family.value} model runs without classifier-free guidance; leave it out")
        filled = {name: getattr(defaults, name) for name in _DEFAULTED if getattr(self, name) is None}
        return replace(self, **filled)

    def to_record(self) -> dict:
        """JSON-ready dict of every field (the sidecar and the PNG/latent metadata)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> GenerationConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"unknown generation settings {unknown}; known: {sorted(known)}")
        return cls(**record)


def _validate(c: GenerationConfig) -> None:
    check_int("seed", c.seed, 0, 2**63 - 1)
    for name in ("steps", "guide_steps"):
        if getattr(c, name) is not None:
            check_int(name, getattr(c, name), 1, 1000)
    if c.warm_start_skip is not None:
        check_int("warm_start_skip", c.warm_start_skip, 0, 999)
        if c.steps is not None and c.warm_start_skip >= c.steps:
            raise ValueError(
                f"warm_start_skip={c.warm_start_skip} must be below steps={c.steps}: the hires pass runs steps "
                f"k..N-1 of an N-step schedule; use at most {c.steps - 1}"
            )
    for name in ("guidance_scale", "guide_guidance_scale"):
        if getattr(c, name) is not None:
            check_float(name, getattr(c, name), 0.0, 100.0)
    for name in ("true_cfg_scale", "guide_true_cfg_scale"):
        if getattr(c, name) is not None:
            check_float(name, getattr(c, name), 1.0, 100.0)
    if not isinstance(c.negative_prompt, str):
        raise ValueError(f"negative_prompt={c.negative_prompt!r} must be text (empty: the unconditional prompt)")
    if not isinstance(c.rho, int) or isinstance(c.rho, bool) or c.rho < 2:
        raise ValueError(f"rho={c.rho!r} must be a whole number >= 2 (the guide is rho times smaller per side)")
    check_int("window_tokens", c.window_tokens, 1)
    check_int("block_tokens", c.block_tokens, 1)
    check_int("cascade_levels", c.cascade_levels, 1, MAX_CASCADE_LEVELS)
    get_policy(c.policy)  # a preset or a readable policy file; raises with the fix
    parse_backend(c.backend)
    if c.shift is not None:
        check_float("shift", c.shift, 0.0, 100.0, low_open=True)
    check_float("sharpen_strength", c.sharpen_strength, 0.0, 10.0)
    check_float("sharpen_sigma_latent_px", c.sharpen_sigma_latent_px, 0.0, 16.0, low_open=True)
    check_float("ntk_factor", c.ntk_factor, 0.0, 1000.0, low_open=True)
    if c.text_tokens is not None:
        check_int("text_tokens", c.text_tokens, 1, MAX_TEXT_TOKENS)
    if c.ff_chunk_tokens is not None:
        check_int("ff_chunk_tokens", c.ff_chunk_tokens, 1)
    if c.vae_tile_px is not None and (not isinstance(c.vae_tile_px, int) or c.vae_tile_px < 128
                                      or c.vae_tile_px % 64):
        raise ValueError(f"vae_tile_px={c.vae_tile_px!r} must be a multiple of 64 px, at least 128 (e.g. 512)")
    if c.lora_path is not None and not Path(c.lora_path).is_file():
        raise ValueError(f"LoRA file {c.lora_path!r} does not exist; pass the path of a .safetensors guide LoRA")
    from ultragen.step_cache import parse_cache

    parse_cache(c.step_cache)  # off, fbcache, fbcache:0.08; one-line error with the fix
    c.layouts()  # sizes: multiples of 16 px, within limits, valid rho / window / text for every cascade level
