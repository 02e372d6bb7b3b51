"""FLUX.1 latents in one place: VAE space <-> the transformer's space, and 2x2 packing into tokens.

The generation pipeline, the decoder and the training cache all go through these functions, so the cache's token
order and scaling cannot drift from what generation uses.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

VAE_SCALE = 8  # FLUX.1's VAE: 8 px per latent pixel; a packed token is 2x2 latent pixels (layout.PATCH_PX = 16)


def to_model_space(z: torch.Tensor, vae) -> torch.Tensor:
    """VAE latents -> the transformer's latents: (z - shift) * scale."""
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def to_vae_space(latents: torch.Tensor, vae) -> torch.Tensor:
    """The inverse of :func:`to_model_space`."""
    return latents / vae.config.scaling_factor + vae.config.shift_factor


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) tokens in raster order (diffusers' packing)."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(packed: torch.Tensor, height_px: int, width_px: int) -> torch.Tensor:
    """(B, tokens, 4C) raster tokens of a height_px x width_px image -> (B, C, height_px/8, width_px/8)."""
    return FluxPipeline._unpack_latents(packed, height_px, width_px, VAE_SCALE)
