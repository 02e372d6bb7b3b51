"""Sampling from a testbed model: the base resolution (stock forward) and 4x with each high-resolution strategy.

Every strategy integrates the same flow-matching ODE with Euler steps on the schedule of
:func:`ultragen.pipeline.schedule.hires_scheduler` (static shift), with classifier-free guidance against the empty
caption. What differs is the velocity function at the hires size:

- ``dense``: the stock model over the whole 4x grid with its true positions (plain extrapolation);
- ``windows``: :class:`~ultragen.flux.HierFluxTransformer` with windows only (no guide segment);
- ``windows+guide``: windows plus the base-resolution sample as the guide (training-free);
- ``windows+guide+lora``: the same with a guide LoRA loaded into the model.

Warm start (any strategy): the base sample, upsampled, sharpened and re-noised to the schedule's sigma at step k
(:func:`ultragen.pipeline.warm_start.warm_start_latent`); steps k..N-1 run. :func:`sample_hires` returns the sigma
it started from, the number of steps it ran and how many of them the step cache skipped
(``SamplerSettings.step_cache``, hierarchical strategies only) with the latents, and the evaluation records them per row. Latents are unpacked (B, C, rows, cols)
float32; the model runs in its own dtype (bfloat16 on CUDA in the evaluation) and its output is integrated in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from ultragen.flux import HierFluxTransformer
from ultragen.pipeline.schedule import hires_scheduler
from ultragen.pipeline.warm_start import warm_start_latent
from ultragen.policy import build_plan, get_policy
from ultragen.step_cache import StepCache, StepCacheConfig, parse_cache
from ultragen.testbed.latent import from_tokens, to_tokens
from ultragen.testbed.model import TestbedConfig, raster_ids
from ultragen.testbed.text import PromptEmbeds

Velocity = Callable[[torch.Tensor, torch.Tensor, PromptEmbeds], torch.Tensor]  # (x, sigma (B,), prompt) -> v


class Strategy(str, Enum):
    DENSE = "dense"
    WINDOWS = "windows"
    GUIDE = "windows+guide"
    GUIDE_LORA = "windows+guide+lora"


@dataclass(frozen=True)
class SamplerSettings:
    """Everything a sample depends on besides the model, prompt and seed."""

    steps: int = 20
    cfg_scale: float = 3.0  # classifier-free guidance against the empty caption (1: none)
    base_shift: float = 1.0  # static schedule shift at the base size (the model was trained there)
    hires_shift: float = 3.0  # static shift at 4x (more noise for more tokens, as FLUX.1-dev's 3)
    warm_start_skip: int = 7  # k of N hires steps skipped under warm start (FLUX.1-dev: 10 of 28)
    sharpen_strength: float = 0.5
    sharpen_sigma_tokens: float = 1.0
    policy: str = "default"
    backend: str = "auto"
    guide_offset_tokens: float | None = None  # guide RoPE positions rho*(m, n) + this; None: centred, (rho - 1) / 2
    step_cache: StepCacheConfig = StepCacheConfig()  # hierarchical strategies: "off", "fbcache", "fbcache:0.08"

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_cache", parse_cache(self.step_cache))
        if self.steps < 1 or not 0 <= self.warm_start_skip < self.steps:
            raise ValueError(f"steps={self.steps} must be >= 1 and warm_start_skip={self.warm_start_skip} in "
                             f"[0, steps)")
        if self.cfg_scale < 0 or self.base_shift <= 0 or self.hires_shift <= 0:
            raise ValueError(f"cfg_scale={self.cfg_scale} must be >= 0 and shifts > 0")
        get_policy(self.policy)  # a preset or a readable policy file, checked before any model loads


def _sigmas(steps: int, skip: int, shift: float) -> torch.Tensor:
    """(steps - skip + 1,) float32 sigmas from step ``skip`` down to 0."""
    scheduler = hires_scheduler(FlowMatchEulerDiscreteScheduler(shift=shift), steps, skip, shift=shift)
    return scheduler.sigmas[skip:].float()


def euler(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, prompt: PromptEmbeds, empty: PromptEmbeds,
          cfg_scale: float) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigmas[0] to sigmas[-1] with classifier-free guidance; x: (B, C, rows, cols)."""
    b = x.shape[0]
    both = PromptEmbeds(torch.cat([prompt.embeds, empty.embeds]), torch.cat([prompt.pooled, empty.pooled]))
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        sigma = torch.full((2 * b,), s, device=x.device)
        v_cond, v_empty = velocity(torch.cat([x, x]), sigma, both).chunk(2)
        x = x + (s_next - s) * (v_empty + cfg_scale * (v_cond - v_empty))
    return x


def stock_velocity(model: FluxTransformer2DModel, grid: tuple[int, int]) -> Velocity:
    """The unmodified model over a ``grid`` of tokens with true (raster) positions."""
    img_ids, dtype = raster_ids(*grid), model.dtype

    def velocity(x, sigma, prompt):
        prompt = prompt.to(x.device, dtype)
        out = model(hidden_states=to_tokens(x).to(dtype), encoder_hidden_states=prompt.embeds,
                    pooled_projections=prompt.pooled, timestep=sigma, img_ids=img_ids.to(x.device),
                    txt_ids=torch.zeros(prompt.embeds.shape[1], 3, device=x.device), return_dict=False)[0]
        return from_tokens(out.float(), grid)

    return velocity


def hier_velocity(model: FluxTransformer2DModel, config: TestbedConfig, scale: int, guide: torch.Tensor | None,
                  settings: SamplerSettings) -> tuple[Velocity, StepCache]:
    """The hierarchical forward at ``scale`` x base: windows only (guide None) or with the clean guide latent
    (B, C, base, base) in the sequence (the batch is doubled for guidance, so the guide is too), and the fresh step
    cache (``settings.step_cache``) it runs with: one state per call of this function (per batch and strategy)."""
    layout = config.layout(scale, guide=guide is not None, guide_offset_tokens=settings.guide_offset_tokens)
    if guide is not None and tuple(guide.shape[-2:]) != layout.guide_image_grid:
        raise ValueError(f"the guide latent is {tuple(guide.shape[-2:])} tokens but a {scale}x layout with rho="
                         f"{config.rho} needs {layout.guide_image_grid}: evaluate at scale = rho so the base sample "
                         f"is the guide")
    plan = build_plan(layout, settings.policy)
    hier = HierFluxTransformer(model, backend=settings.backend)
    cache = hier.set_step_cache(settings.step_cache)
    dtype, guide_seq = model.dtype, None
    if guide is not None:
        guide_seq = layout.guide_to_sequence(layout.pad_guide(to_tokens(torch.cat([guide, guide])))).to(dtype)
    grid = layout.padded_grid

    def velocity(x, sigma, prompt):
        prompt = prompt.to(x.device, dtype)
        out = hier(layout.hires_to_sequence(to_tokens(x)).to(dtype), prompt.embeds, prompt.pooled, sigma, plan,
                   guide=guide_seq)
        return from_tokens(layout.hires_to_raster(out).float(), grid)

    return velocity, cache


@torch.no_grad()
def sample_base(model: FluxTransformer2DModel, config: TestbedConfig, prompt: PromptEmbeds, empty: PromptEmbeds,
                noise: torch.Tensor, settings: SamplerSettings) -> torch.Tensor:
    """Base-resolution latents (B, C, base, base) from ``noise`` of that shape."""
    grid = (config.base_tokens, config.base_tokens)
    sigmas = _sigmas(settings.steps, 0, settings.base_shift)
    return euler(stock_velocity(model, grid), noise, sigmas, prompt, empty, settings.cfg_scale)


@dataclass(frozen=True)
class HiresSample:
    """``latents``: (B, C, scale * base, scale * base) float32; ``start_sigma``: the noise level the integration
    started from (1 cold, the schedule's sigma at step k under warm start); ``steps_run``: Euler steps taken (one
    transformer call each, CFG batched); ``steps_skipped``: those of them whose blocks after the first the step cache
    skipped (0 with the cache off or for ``dense``)."""

    latents: torch.Tensor
    start_sigma: float
    steps_run: int
    steps_skipped: int = 0


@torch.no_grad()
def sample_hires(model: FluxTransformer2DModel, config: TestbedConfig, strategy: Strategy, warm_start: bool,
                 guide: torch.Tensor, prompt: PromptEmbeds, empty: PromptEmbeds, noise: torch.Tensor,
                 settings: SamplerSettings, scale: int = 4) -> HiresSample:
    """The hires sample and where its integration started. ``guide``: the base sample (B, C, base, base), used as
    the guide stream by the guide strategies and as the warm-start image when ``warm_start``. The LoRA strategy
    expects the LoRA already loaded into ``model``."""
    strategy = Strategy(strategy)
    size = (config.base_tokens * scale, config.base_tokens * scale)
    cache = None
    if strategy is Strategy.DENSE:
        velocity = stock_velocity(model, size)
    else:
        velocity, cache = hier_velocity(model, config, scale, None if strategy is Strategy.WINDOWS else guide,
                                        settings)
    skip = settings.warm_start_skip if warm_start else 0
    sigmas = _sigmas(settings.steps, skip, settings.hires_shift)
    x = noise
    if warm_start:
        x = warm_start_latent(guide, size, noise, float(sigmas[0]), settings.sharpen_strength,
                              settings.sharpen_sigma_tokens)
    latents = euler(velocity, x, sigmas, prompt, empty, settings.cfg_scale)
    return HiresSample(latents, float(sigmas[0]), len(sigmas) - 1, cache.skipped if cache is not None else 0)
