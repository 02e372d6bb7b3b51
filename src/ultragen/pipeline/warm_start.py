"""Warm start of the hires pass from the guide, in latent space (no VAE round trip).

upsample (bicubic, exactly rho x) -> unsharp mask of FIXED strength and sigma -> re-noise to the schedule's sigma at
the first kept step: ``x = (1 - sigma_k) * x_up + sigma_k * noise``. The authors' first release drew the blur sigma
at random on every call (research/authors_repo.md 5.3); here both strength and sigma are settings and recorded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def upsample_latent(latent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of an unpacked latent (B, C, h, w) -> (B, C, *size), computed in float32."""
    out = F.interpolate(latent.float(), size=size, mode="bicubic", align_corners=False)
    return out.to(latent.dtype)


def gaussian_blur(x: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding; kernel radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma_px))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)  # reflect padding needs radius < side
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma_px) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def unsharp_mask(x: torch.Tensor, strength: float, sigma_px: float) -> torch.Tensor:
    """``x + strength * (x - blur(x))`` on (B, C, H, W); strength 0 returns x unchanged."""
    if strength == 0:
        return x
    xf = x.float()
    return (xf + strength * (xf - gaussian_blur(xf, sigma_px))).to(x.dtype)


def renoise(x_clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The flow-matching interpolant at ``sigma``: (1 - sigma) * x_clean + sigma * noise (any shape)."""
    return (1.0 - sigma) * x_clean + sigma * noise


def warm_start_latent(
    guide: torch.Tensor, size: tuple[int, int], noise: torch.Tensor, sigma: float, strength: float, sigma_px: float
) -> torch.Tensor:
    """Unpacked clean guide latent (B, C, h, w) -> unpacked start latent (B, C, *size) at noise level ``sigma``.

    ``noise``: (B, C, *size) standard normal."""
    x_up = unsharp_mask(upsample_latent(guide, size), strength, sigma_px)
    return renoise(x_up, noise.to(x_up.dtype), sigma)
