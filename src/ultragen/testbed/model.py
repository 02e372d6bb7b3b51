"""Testbed model configurations: diffusers' ``FluxTransformer2DModel`` (the FLUX.1 class) at small sizes.

A config fixes everything a trained testbed model depends on: the model's widths, the latent (``token_px``), the
prompt encoding, and the base token grid it is trained at. Generation geometry (windows, blocks, rho) lives here
too, so training, LoRA training and evaluation agree. Two presets:

- ``base``: the GPU testbed: 32x32-token base (128x128 px), 8x8-token windows (a base image is 4x4 windows, the
  4x image 16x16), 64-token blocks (one window per block), rho 4 (the guide of a 4x image is exactly a base image);
  64 text tokens; 4 double + 4 single blocks, 4 heads of 64 (width 256, 13.8 M parameters). Head dim 64 and
  64-token blocks are what the Triton kernel takes, so the 4x evaluation runs the same fast path as FLUX.
- ``cpu-tiny``: the same geometry halved (16x16 tokens, 4x4-token windows, 16-token blocks), 2 + 2 blocks, 4 heads
  of 16: trains for a few minutes on two CPU cores to check that everything runs and learns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from diffusers import FluxTransformer2DModel

from ultragen.layout import HierLayout, make_layout
from ultragen.testbed.latent import LatentCodec, layout_px
from ultragen.testbed.text import SceneTextEncoder


@dataclass(frozen=True)
class TestbedConfig:
    """One testbed model and its geometry. Sizes are in tokens unless named ``_px``."""

    __test__ = False  # not a pytest class

    name: str = "base"
    base_tokens: int = 32  # side of the training token grid
    token_px: int = 4  # pixels per token side (LatentCodec)
    window_tokens: int = 8
    block_tokens: int = 64
    rho: int = 4
    text_tokens: int = 64
    layers: int = 4
    single_layers: int = 4
    heads: int = 4
    head_dim: int = 64
    axes_dims_rope: tuple[int, int, int] = (8, 28, 28)
    joint_dim: int = 32
    pooled_dim: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope} must be even and sum to head_dim={self.head_dim}")
        if self.base_tokens % self.window_tokens:
            raise ValueError(f"base_tokens={self.base_tokens} must be a multiple of window_tokens={self.window_tokens}"
                             f" so the base image is whole windows")
        self.layout(1)  # make_layout validates window, block, text and rho and raises with the fix
        self.text_encoder()

    @property
    def base_px(self) -> int:
        return self.base_tokens * self.token_px

    @property
    def window_px(self) -> int:
        return self.window_tokens * self.token_px

    def codec(self) -> LatentCodec:
        return LatentCodec(self.token_px)

    def text_encoder(self) -> SceneTextEncoder:
        return SceneTextEncoder(self.text_tokens, self.joint_dim, self.pooled_dim)

    def layout(self, scale: int, guide: bool = True, **overrides) -> HierLayout:
        """Layout of a ``scale`` x base image (with the rho guide, or windows only); ``overrides`` go to
        ``make_layout`` (e.g. ``guide_offset_tokens``). The layout measures FLUX pixels: 16 per token."""
        side = layout_px(self.base_tokens * scale)
        kwargs = {"window_tokens": self.window_tokens, "rho": self.rho if guide else None,
                  "text_tokens": self.text_tokens, "block_tokens": self.block_tokens}
        return make_layout(side, side, **(kwargs | overrides))

    def build_model(self, seed: int = 0) -> FluxTransformer2DModel:
        """A freshly initialised model (float32, seeded)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return FluxTransformer2DModel(
                patch_size=1, in_channels=self.codec().channels, num_layers=self.layers,
                num_single_layers=self.single_layers, attention_head_dim=self.head_dim, num_attention_heads=self.heads,
                joint_attention_dim=self.joint_dim, pooled_projection_dim=self.pooled_dim, guidance_embeds=False,
                axes_dims_rope=self.axes_dims_rope,
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["axes_dims_rope"] = list(self.axes_dims_rope)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TestbedConfig:
        known = {f.name for f in fields(cls)}
        if unknown := set(data) - known:
            raise ValueError(f"unknown testbed config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


PRESETS: dict[str, TestbedConfig] = {
    "base": TestbedConfig(),
    "cpu-tiny": TestbedConfig(name="cpu-tiny", base_tokens=16, window_tokens=4, block_tokens=16, text_tokens=16,
                              layers=2, single_layers=2, heads=4, head_dim=16, axes_dims_rope=(4, 6, 6)),
}


def get_config(name: str) -> TestbedConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown testbed preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def raster_ids(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 3) float32 FLUX image ids (0, row, col) in raster order: the stock model's positions."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).view(-1, 3).float()
