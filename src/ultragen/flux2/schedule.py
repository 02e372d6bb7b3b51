"""FLUX.2 [klein] schedule defaults and timesteps.

Variants (diffusers' ``Flux2KleinPipeline`` config ``is_distilled``): the step-distilled klein-4B / klein-9B run
4 steps without CFG (the pipeline ignores guidance_scale for them); the base models (klein-base-4B / -9B) run
CFG with scale 4 against the empty prompt, 50 steps by default. Timesteps are the stock pipeline's: sigmas
``linspace(1, 1/N, N)`` with the empirical shift ``mu = compute_empirical_mu(image_tokens, N)`` through the
scheduler's dynamic shifting (both reused from diffusers).

Warm start (start the hires stage from the upsampled guide at an intermediate sigma) is off by default for klein:
the authors switch it off in their klein code (``interpolation_init: false``; their hires stage runs its whole
schedule from noise, research notes authors_repo.md section 5.3), and with 4 distilled steps a skipped step is a
quarter of the schedule. It stays an explicit option.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps


class KleinVariant(str, Enum):
    DISTILLED = "distilled"  # klein-4B, klein-9B: 4 steps, no CFG
    BASE = "base"  # klein-base-4B, klein-base-9B: CFG, ~50 steps


@dataclass(frozen=True)
class ScheduleDefaults:
    """Default steps and guidance of the two stages of one variant."""

    guide_steps: int
    hires_steps: int
    cfg_scale: float | None  # None: no CFG (distilled)
    warm_start: bool = False

    def __post_init__(self) -> None:
        if self.guide_steps < 1 or self.hires_steps < 1:
            raise ValueError(f"guide_steps={self.guide_steps} and hires_steps={self.hires_steps} must be >= 1")
        if self.cfg_scale is not None and self.cfg_scale <= 1:
            raise ValueError(f"cfg_scale={self.cfg_scale} must be > 1 (or None for no CFG)")


# distilled: the 4 steps the model was distilled for, in both stages (the authors: 4 + 4). base: diffusers' 50 steps
# and CFG 4 for the guide; 28 hires steps from noise (the authors' README; their config has 18), not measured here.
DEFAULTS = {
    KleinVariant.DISTILLED: ScheduleDefaults(guide_steps=4, hires_steps=4, cfg_scale=None),
    KleinVariant.BASE: ScheduleDefaults(guide_steps=50, hires_steps=28, cfg_scale=4.0),
}


def klein_variant(is_distilled: bool) -> KleinVariant:
    """The variant from ``Flux2KleinPipeline.config.is_distilled`` (model_index.json)."""
    return KleinVariant.DISTILLED if is_distilled else KleinVariant.BASE


def schedule_defaults(is_distilled: bool) -> ScheduleDefaults:
    return DEFAULTS[klein_variant(is_distilled)]


def set_timesteps(scheduler, num_steps: int, image_tokens: int, device: torch.device | str | None = None):
    """Set ``scheduler`` to the stock klein schedule of ``num_steps`` steps for an image of ``image_tokens`` tokens
    (the token count the shift is computed for; the stock pipeline uses the generated image's). Returns the
    timesteps (num_steps,), scale 1000 (divide by 1000 for the transformer)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    if getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    mu = compute_empirical_mu(image_seq_len=image_tokens, num_steps=num_steps)
    timesteps, _ = retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, mu=mu)
    return timesteps
