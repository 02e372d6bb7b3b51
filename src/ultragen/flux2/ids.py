"""FLUX.2 position ids (four axes T, H, W, L) for the hierarchical sequence, and their rotary tables.

FLUX.2 gives every token a (T, H, W, L) id (diffusers' ``Flux2KleinPipeline._prepare_text_ids`` and
``_prepare_latent_ids``): text token l is (0, 0, 0, l); image token (r, c) is (0, r, c, 0). The hierarchical
sequence keeps those and adds the guide at the image's T and L, with H and W scaled by rho onto the hires grid:
guide token (m, n) is (0, rho*m + offset, rho*n + offset, 0), offset = ``layout.guide_offset_tokens`` ((rho-1)/2 by
default, the centre of its footprint; 0 in the authors' code). The geometry (window-first order, the rho scaling and
offset) comes from :class:`ultragen.layout.HierLayout`, whose three-axis FLUX.1 ids hold exactly the (H, W) pair.
All ids are float32 (bf16 cannot hold integers above 256).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

from ultragen.layout import HierLayout

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (S, head_dim) float32


def text_ids(text_tokens: int) -> torch.Tensor:
    """(text_tokens, 4) float32: (0, 0, 0, l), diffusers' klein text ids."""
    return Flux2KleinPipeline._prepare_text_ids(torch.empty(1, text_tokens, 0))[0].float()


def _image_axes(hw: torch.Tensor) -> torch.Tensor:
    """(S, 2) (H, W) -> (S, 4) (T=0, H, W, L=0)."""
    ids = torch.zeros(hw.shape[0], 4, dtype=torch.float32)
    ids[:, 1:3] = hw
    return ids


def raster_image_ids(rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, 4) float32 (0, r, c, 0) in raster order: diffusers' klein latent ids."""
    return Flux2KleinPipeline._prepare_latent_ids(torch.empty(1, 0, rows, cols))[0].float()


def hires_ids(layout: HierLayout) -> torch.Tensor:
    """(hires_tokens, 4) float32 (0, r, c, 0) of each hires token, in sequence (window-first) order."""
    return _image_axes(layout.hires_ids()[:, 1:3])


def guide_ids(layout: HierLayout) -> torch.Tensor:
    """(guide_tokens, 4) float32 (0, rho*m + offset, rho*n + offset, 0), in sequence (tile-first) order."""
    return _image_axes(layout.guide_ids()[:, 1:3])


def sequence_ids(layout: HierLayout) -> torch.Tensor:
    """(seq_tokens, 4) float32 ids of the whole ``[text | hires | guide]`` sequence."""
    return torch.cat([text_ids(layout.text_tokens), hires_ids(layout), guide_ids(layout)])


def flux2_rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float, ntk_factor: float = 1.0) -> Rope:
    """(cos, sin), each (S, head_dim), for ids (S, 4) float32: diffusers' ``Flux2PosEmbed`` with its base stretched
    to theta * ntk_factor (the NTK factor of ``get_1d_rotary_pos_embed``; 1 is the stock model)."""
    if ids.dtype != torch.float32:
        raise ValueError(f"position ids must be float32 (got {ids.dtype}); bf16 loses integers above 256")
    return Flux2PosEmbed(theta=theta * ntk_factor, axes_dim=list(axes_dim))(ids)
