"""Real FLUX architectures with random weights, for benchmarks and GPU tests (no weights can be downloaded here).

:data:`CONFIGS` names every benchmarked architecture per family (``ultragen bench step --family F --config C``)."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

# black-forest-labs/FLUX.1-dev transformer/config.json (11.9 B parameters); schnell differs only in guidance_embeds
FLUX1_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


# FLUX.2 [klein] transformers (diffusers Flux2Transformer2DModel; DESIGN.md "FLUX.2 [klein]"): klein-4B 5 double + 20
# single blocks, 24 heads x 128 (3.88 B parameters); klein-9B 8 + 24, 32 x 128 (9.08 B). Both: in_channels 128 (the
# 2x2-patchified 32-channel latent), mlp_ratio 3, four RoPE axes of 32 with theta 2000, no guidance embedding
# (diffusers' defaults for those). joint_attention_dim is 3 stacked Qwen3 hidden states: Qwen3-4B's 2560 (klein-4B)
# and Qwen3-8B's 4096 (klein-9B) -> 7680 and 12288.
_KLEIN = dict(patch_size=1, in_channels=128, attention_head_dim=128, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
              rope_theta=2000, timestep_guidance_channels=256, guidance_embeds=False)
KLEIN_4B = dict(_KLEIN, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680)
KLEIN_9B = dict(_KLEIN, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288)

CONFIGS = {"flux1": {"dev": FLUX1_DEV}, "flux2": {"klein-4b": KLEIN_4B, "klein-9b": KLEIN_9B}}


def bench_config(family: str, name: str | None) -> tuple[str, dict]:
    """(name, architecture) of ``--family F --config C``; C defaults to the family's first."""
    if family not in CONFIGS:
        raise ValueError(f"--family {family!r} is not benchmarked; use one of {', '.join(CONFIGS)}")
    configs = CONFIGS[family]
    name = name or next(iter(configs))
    if name not in configs:
        raise ValueError(f"--config {name!r} is not a {family} architecture; use one of {', '.join(configs)}")
    return name, configs[name]


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
