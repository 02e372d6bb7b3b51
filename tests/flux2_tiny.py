"""A tiny Flux2Transformer2DModel and inputs for CPU tests (random weights, float32)."""

import torch
from diffusers import Flux2Transformer2DModel

from ultragen.layout import make_layout

TEXT_TOKENS, JOINT_DIM, CHANNELS = 8, 24, 8


def tiny_flux2(layers: int = 2, single_layers: int = 2, seed: int = 0, guidance_embeds: bool = False):
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=CHANNELS, num_layers=layers, num_single_layers=single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, timestep_guidance_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=guidance_embeds,
    )
    # diffusers initialises some projections to zero; random weights everywhere make every path count
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * p.shape[-1] ** -0.5 if p.dim() > 1 else 1 + 0.1 * noise)
    return model.eval()


def tiny_layout(rows: int, cols: int, window: int = 4, rho: int | None = 2, block: int = 8, **kwargs):
    return make_layout(rows * 16, cols * 16, window_tokens=window, rho=rho, text_tokens=TEXT_TOKENS,
                       block_tokens=block, **kwargs)


def tiny_inputs(layout, batch: int = 1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "hires": torch.randn(batch, layout.hires_tokens, CHANNELS, generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, JOINT_DIM, generator=g),
        "timestep": torch.full((batch,), 0.7),
    }
    inputs["guide"] = torch.randn(batch, layout.guide_tokens, CHANNELS, generator=g) if layout.rho else None
    return inputs
