"""FLUX rotary position embedding with an NTK factor, computed from float32 position ids."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed


def flux_rope(
    ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0, ntk_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (S, head_dim), for ids (S, n_axes) float32. With ntk_factor 1 this is exactly diffusers'
    ``FluxPosEmbed``; ntk_factor > 1 stretches the wavelengths (theta * ntk), as the paper does (10 for FLUX.1)."""
    if ids.dtype != torch.float32:
        raise ValueError(f"position ids must be float32 (got {ids.dtype}); bf16 loses integers above 256")
    freqs_dtype = torch.float32 if ids.device.type in ("mps", "npu") else torch.float64
    cos_out, sin_out = [], []
    for axis, dim in enumerate(axes_dim):
        cos, sin = get_1d_rotary_pos_embed(
            dim, ids[:, axis], theta=theta, ntk_factor=ntk_factor, repeat_interleave_real=True, use_real=True,
            freqs_dtype=freqs_dtype,
        )
        cos_out.append(cos)
        sin_out.append(sin)
    return torch.cat(cos_out, dim=-1).to(ids.device), torch.cat(sin_out, dim=-1).to(ids.device)
