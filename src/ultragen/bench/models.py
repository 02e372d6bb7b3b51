"""Real FLUX architectures with random weights, for benchmarks and GPU tests (no weights can be downloaded here)."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

# black-forest-labs/FLUX.1-dev transformer/config.json (11.9 B parameters); schnell differs only in guidance_embeds
FLUX1_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


def random_flux(config: dict = FLUX1_DEV, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                seed: int = 0) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel of ``config`` built directly on ``device`` in ``dtype`` with random weights."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def random_inputs(model: FluxTransformer2DModel, hires_tokens: int, guide_tokens: int, text_tokens: int = 512,
                  batch: int = 1, seed: int = 0) -> dict:
    """Random hierarchical-forward inputs for ``model`` (see HierFluxTransformer.forward)."""
    cfg = model.config
    device, dtype = model.device, model.dtype
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    return {
        "hires": rand(batch, hires_tokens, cfg.in_channels),
        "guide": rand(batch, guide_tokens, cfg.in_channels) if guide_tokens else None,
        "encoder_hidden_states": rand(batch, text_tokens, cfg.joint_attention_dim),
        "pooled_projections": rand(batch, cfg.pooled_projection_dim),
        "timestep": torch.full((batch,), 0.8, device=device, dtype=dtype),
        "guidance": torch.full((batch,), 3.5, device=device, dtype=dtype) if cfg.guidance_embeds else None,
    }
