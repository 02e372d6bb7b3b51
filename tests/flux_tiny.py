"""A tiny FluxTransformer2DModel and inputs for CPU tests (random weights, float32)."""

import torch
from diffusers import FluxTransformer2DModel

from ultragen.layout import make_layout

TEXT_TOKENS, JOINT_DIM, POOLED_DIM, CHANNELS = 8, 32, 32, 4


def tiny_flux(layers: int = 1, single_layers: int = 1, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=CHANNELS, num_layers=layers, num_single_layers=single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return model.eval()


def tiny_layout(rows: int, cols: int, window: int = 4, rho: int | None = 2, block: int = 8):
    return make_layout(rows * 16, cols * 16, window_tokens=window, rho=rho, text_tokens=TEXT_TOKENS, block_tokens=block)


def tiny_inputs(layout, batch: int = 1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "hires": torch.randn(batch, layout.hires_tokens, CHANNELS, generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, JOINT_DIM, generator=g),
        "pooled_projections": torch.randn(batch, POOLED_DIM, generator=g),
        "timestep": torch.full((batch,), 0.7),
        "guidance": torch.full((batch,), 3.5),
    }
    inputs["guide"] = torch.randn(batch, layout.guide_tokens, CHANNELS, generator=g) if layout.rho else None
    return inputs
