"""The hires (stage B) sampling schedule: diffusers' flow-matching Euler scheduler with a static shift.

An N-step schedule is ``sigma_lin = linspace(1, 1/N, N)`` shifted statically, ``sigma = s * sigma_lin / (1 + (s-1) *
sigma_lin)`` (FlowMatchEulerDiscreteScheduler with ``use_dynamic_shifting=False``). The warm start skips the first k
steps: it re-noises the upsampled guide to ``sigma[k]`` and runs steps k..N-1. FLUX.1-dev (s = 3), N = 28, k = 10:
sigma_lin = 18/28 and sigma = 0.84375.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def hires_scheduler(
    base: FlowMatchEulerDiscreteScheduler, steps: int, skip: int, shift: float | None = None,
    device: torch.device | str | None = None,
) -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler for stage B: ``base``'s config with dynamic shifting off and the static ``shift``
    (None: ``base.config.shift``), set to ``steps`` steps and positioned at step ``skip``.

    ``scheduler.timesteps[skip:]`` are the steps to run; ``scheduler.sigmas[skip]`` is the warm-start sigma.
    """
    if not 0 <= skip < steps:
        raise ValueError(f"warm_start_skip={skip} must be in [0, steps={steps}); use at most {steps - 1}")
    shift = base.config.shift if shift is None else shift
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(base.config, use_dynamic_shifting=False, shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=device)
    scheduler.set_begin_index(skip)
    return scheduler


def warm_start_sigma(steps: int, skip: int, shift: float) -> float:
    """Closed form of ``hires_scheduler(...).sigmas[skip]``: the sigma the guide is re-noised to."""
    if not 0 <= skip < steps:
        raise ValueError(f"warm_start_skip={skip} must be in [0, steps={steps})")
    sigma_lin = 1.0 - skip / steps
    return shift * sigma_lin / (1.0 + (shift - 1.0) * sigma_lin)
