"""The testbed's "VAE": a fixed, exactly invertible image <-> latent transform (no training, no weights).

One transformer token covers ``token_px x token_px`` pixels (default 4). The transform is pixel-unshuffle by
``token_px`` followed by an orthonormal channel mix: an opponent colour basis (luma, red-green, blue-yellow) times
a 2D orthonormal DCT over the patch, so channel 0 is the patch's mean luma and higher channels hold finer detail.
Values are scaled by ``1 / token_px`` so a flat patch has a latent of order one. Decoding is the transpose: the
round trip is exact to float precision.

Geometry: the testbed keeps images in *token units*. ``ultragen.layout`` measures sizes in FLUX pixels (16 per
token), so a testbed image of (rows, cols) tokens is laid out with ``make_layout(rows * 16, cols * 16, ...)``
(:func:`layout_px`); its real size is (rows * token_px, cols * token_px) pixels. The latent is the *unpacked*
(B, C, rows, cols) tensor with one latent pixel per token, so ``latent.flatten(2).transpose(1, 2)`` is the raster
token sequence (B, rows * cols, C) and the pipeline's warm start (bicubic upsampling of unpacked latents) applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from ultragen.layout import PATCH_PX


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II, (n, n): row k is the k-th cosine."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_OPPONENT = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=np.float64)
_OPPONENT /= np.linalg.norm(_OPPONENT, axis=1, keepdims=True)


@dataclass(frozen=True)
class LatentCodec:
    """Image (B, 3, H, W) in [0, 1] <-> latent (B, 3 * token_px**2, H / token_px, W / token_px)."""

    token_px: int = 4

    def __post_init__(self) -> None:
        if self.token_px < 1:
            raise ValueError(f"token_px={self.token_px} must be >= 1 pixel per token")

    @property
    def channels(self) -> int:
        return 3 * self.token_px**2

    @cached_property
    def mix(self) -> torch.Tensor:
        """(channels, channels) float64 orthonormal matrix acting on pixel-unshuffle's (colour, dy, dx) order."""
        d = _dct_matrix(self.token_px)
        return torch.from_numpy(np.kron(_OPPONENT, np.kron(d, d)))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of token_px -> (B, C, H / token_px, W / token_px)."""
        p = self.token_px
        if image.dim() != 4 or image.shape[1] != 3 or image.shape[-1] % p or image.shape[-2] % p:
            raise ValueError(f"image must be (B, 3, H, W) with H, W multiples of token_px={self.token_px}, "
                             f"got {tuple(image.shape)}")
        patches = F.pixel_unshuffle(image * 2 - 1, self.token_px)
        return self._apply(self.mix / self.token_px, patches)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, h * token_px, w * token_px) image; not clamped (clamp before saving)."""
        if latent.dim() != 4 or latent.shape[1] != self.channels:
            raise ValueError(f"latent must be (B, {self.channels}, h, w) for token_px={self.token_px}, "
                             f"got {tuple(latent.shape)}")
        patches = self._apply(self.mix.T * self.token_px, latent)
        return (F.pixel_shuffle(patches, self.token_px) + 1) / 2

    @staticmethod
    def _apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", matrix.to(x.device, x.dtype), x)


def layout_px(tokens: int) -> int:
    """The size to pass to ``ultragen.layout.make_layout`` for a side of ``tokens`` testbed tokens."""
    return tokens * PATCH_PX


def to_tokens(latent: torch.Tensor) -> torch.Tensor:
    """Unpacked (B, C, rows, cols) -> raster token sequence (B, rows * cols, C)."""
    return latent.flatten(2).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Raster token sequence (B, rows * cols, C) -> unpacked (B, C, rows, cols)."""
    rows, cols = grid
    if tokens.shape[1] != rows * cols:
        raise ValueError(f"{tokens.shape[1]} tokens do not fill a {rows}x{cols} grid")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)

