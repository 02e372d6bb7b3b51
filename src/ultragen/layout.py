"""Token geometry of one hierarchical forward: pixels -> tokens, padding, window-first order, guide tiles.

The sequence of one stage-B forward is ``[text | hires | guide]``:

- ``text``: ``text_tokens`` prompt tokens (position ids zero, as in FLUX);
- ``hires``: the (padded) high-resolution token grid laid out window-first: windows in raster order, the tokens
  of one window contiguous (raster order inside the window, or a Hilbert curve), so a window is
  ``window_tokens**2 / block_tokens`` whole attention blocks;
- ``guide``: the low-resolution guide grid (``rho`` times smaller per axis) laid out tile-first, each tile a
  compact 2D patch of exactly ``block_tokens`` guide tokens.

Every block of ``block_tokens`` consecutive sequence positions is therefore a compact rectangle of one segment,
which is what lets the attention policy be defined, and the kernels skip work, at block level.

Sizes that do not tile are padded at the bottom and right to whole windows; the image is generated on that
padded canvas and cropped back (:meth:`HierLayout.crop_box_px`). The guide image is the canvas / ``rho``
(``guide_image_grid``, what stage A generates); its token grid is extended to whole guide tiles (``guide_grid``)
by repeating its edge tokens (:meth:`HierLayout.pad_guide`): those extra tokens are only ever keys, so the guide's
composition is the canvas's, not that of a larger picture. Permutations follow the gather convention:
``x_seq = x_raster[:, perm]`` and ``x_raster = x_seq[:, inverse]``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property

import torch

PATCH_PX = 16  # one FLUX token covers 16x16 pixels (FLUX.1: VAE /8 then 2x2 packing; FLUX.2: /16)
MAX_SIDE_PX = 32768  # beyond this a side is almost certainly a typo (and the guide alone is a 8K image)


class Segment(IntEnum):
    """Which part of the sequence a token or block belongs to."""

    TEXT = 0
    HIRES = 1
    GUIDE = 2


class InWindowOrder(IntEnum):
    """Token order inside one window (both keep every attention block a compact rectangle)."""

    RASTER = 0
    HILBERT = 1


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_side(name: str, value_px: int) -> None:
    if not isinstance(value_px, int) or isinstance(value_px, bool):
        raise ValueError(f"{name}={value_px!r} must be an integer number of pixels")
    if value_px <= 0:
        raise ValueError(f"{name}={value_px} px must be positive; FLUX sizes are multiples of {PATCH_PX} px")
    if value_px > MAX_SIDE_PX:
        raise ValueError(
            f"{name}={value_px} px is above the limit of {MAX_SIDE_PX} px a side; "
            f"use at most {MAX_SIDE_PX}"
        )
    if value_px % PATCH_PX:
        lo, hi = value_px // PATCH_PX * PATCH_PX, _round_up(value_px, PATCH_PX)
        raise ValueError(
            f"{name}={value_px} px is not a multiple of {PATCH_PX} px (one FLUX token: VAE /8 and 2x2 packing); "
            f"use {lo or hi} or {hi}"
        )


def hilbert_order(n: int) -> torch.Tensor:
    """Raster indices of an n x n grid (n a power of two) in Hilbert-curve order. Shape (n*n,), int64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hilbert order needs a power-of-two window, got window_tokens={n}; use 8, 16 or 32")
    d = torch.arange(n * n)
    x = torch.zeros_like(d)
    y = torch.zeros_like(d)
    t = d.clone()
    s = 1
    while s < n:  # the classic d -> (x, y) walk, vectorised over every d
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        flip = ry == 0
        swap_x = torch.where(flip & (rx == 1), s - 1 - x, x)
        swap_y = torch.where(flip & (rx == 1), s - 1 - y, y)
        x, y = torch.where(flip, swap_y, swap_x), torch.where(flip, swap_x, swap_y)
        x = x + s * rx
        y = y + s * ry
        t = t // 4
        s *= 2
    return y * n + x  # y is the row


def _tile_first_perm(rows: int, cols: int, tile_rows: int, tile_cols: int, inner: torch.Tensor) -> torch.Tensor:
    """Raster index (in a rows x cols grid) of every sequence position when tiles are visited in raster order and
    the tokens inside a tile in the order ``inner`` (raster indices of a tile_rows x tile_cols tile)."""
    tr = torch.arange(rows // tile_rows).view(-1, 1, 1)
    tc = torch.arange(cols // tile_cols).view(1, -1, 1)
    r = tr * tile_rows + (inner // tile_cols).view(1, 1, -1)
    c = tc * tile_cols + (inner % tile_cols).view(1, 1, -1)
    return (r * cols + c).reshape(-1)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def _guide_tile_shapes(block_tokens: int) -> list[tuple[int, int]]:
    """Compact (rows, cols) factorisations of one block, at most 8:1, most square first."""
    shapes = [(r, block_tokens // r) for r in range(1, block_tokens + 1) if block_tokens % r == 0]
    shapes = [s for s in shapes if max(s) <= 8 * min(s)]
    return sorted(shapes, key=lambda s: (max(s) / min(s), -s[1]))


@dataclass(frozen=True)
class HierLayout:
    """Geometry of one hierarchical forward. Build with :func:`make_layout`; every field is derived there.

    Grids are (rows, cols) in tokens. ``hires_grid`` is the image as asked; ``padded_grid`` the canvas that is
    generated (whole windows); ``guide_image_grid`` the guide image, ``padded_grid / rho``; ``guide_grid`` the
    guide's token grid in the sequence: the guide image extended to whole guide tiles by edge repetition.
    """

    height_px: int
    width_px: int
    window_tokens: int
    rho: int | None  # None: no guide segment (plain windowed attention, or the stock model's full window)
    text_tokens: int
    block_tokens: int
    in_window_order: InWindowOrder
    guide_offset_tokens: float  # guide id = rho * (m, n) + offset
    hires_grid: tuple[int, int]
    padded_grid: tuple[int, int]
    guide_grid: tuple[int, int]  # (0, 0) without a guide
    guide_tile: tuple[int, int]  # (0, 0) without a guide
    guide_image_grid: tuple[int, int] = (0, 0)  # padded_grid / rho; (0, 0) without a guide

    # --- sizes --------------------------------------------------------------------------------------------
    @property
    def hires_tokens(self) -> int:
        return self.padded_grid[0] * self.padded_grid[1]

    @property
    def guide_tokens(self) -> int:
        return self.guide_grid[0] * self.guide_grid[1]

    @property
    def seq_tokens(self) -> int:
        return self.text_tokens + self.hires_tokens + self.guide_tokens

    @property
    def n_blocks(self) -> int:
        return self.seq_tokens // self.block_tokens

    @property
    def segment_offsets(self) -> tuple[int, int, int, int]:
        """Start of text, hires and guide, and the end of the sequence."""
        t, h = self.text_tokens, self.text_tokens + self.hires_tokens
        return 0, t, h, h + self.guide_tokens

    @property
    def padded_height_px(self) -> int:
        return self.padded_grid[0] * PATCH_PX

    @property
    def padded_width_px(self) -> int:
        return self.padded_grid[1] * PATCH_PX

    @property
    def guide_height_px(self) -> int:
        """Height of the guide image (stage A), canvas / rho."""
        return self.guide_image_grid[0] * PATCH_PX

    @property
    def guide_width_px(self) -> int:
        return self.guide_image_grid[1] * PATCH_PX

    @property
    def window_grid(self) -> tuple[int, int]:
        return self.padded_grid[0] // self.window_tokens, self.padded_grid[1] // self.window_tokens

    def crop_box_px(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of the requested image inside the padded canvas."""
        return 0, 0, self.height_px, self.width_px

    # --- permutations -------------------------------------------------------------------------------------
    @cached_property
    def hires_perm(self) -> torch.Tensor:
        """(hires_tokens,) int64: raster index (padded grid) of the token at each hires sequence position."""
        w = self.window_tokens
        if self.in_window_order is InWindowOrder.HILBERT:
            inner = hilbert_order(w)
        else:
            inner = torch.arange(w * w)
        return _tile_first_perm(*self.padded_grid, w, w, inner)

    @cached_property
    def hires_inverse(self) -> torch.Tensor:
        return _inverse(self.hires_perm)

    @cached_property
    def guide_perm(self) -> torch.Tensor:
        """(guide_tokens,) int64: raster index (guide grid) of the token at each guide sequence position."""
        if self.rho is None:
            return torch.zeros(0, dtype=torch.long)
        th, tw = self.guide_tile
        return _tile_first_perm(*self.guide_grid, th, tw, torch.arange(th * tw))

    @cached_property
    def guide_inverse(self) -> torch.Tensor:
        return _inverse(self.guide_perm)

    def hires_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, hires_tokens, C) raster order -> window-first order."""
        return x[:, self.hires_perm.to(x.device)]

    def hires_to_raster(self, x: torch.Tensor) -> torch.Tensor:
        """(B, hires_tokens, C) window-first order -> raster order."""
        return x[:, self.hires_inverse.to(x.device)]

    def guide_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, guide_tokens, C) raster order -> tile-first order."""
        return x[:, self.guide_perm.to(x.device)]

    def guide_to_raster(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.guide_inverse.to(x.device)]

    @cached_property
    def _guide_pad_index(self) -> torch.Tensor:
        (rows, cols), (image_rows, image_cols) = self.guide_grid, self.guide_image_grid
        r = torch.arange(rows).clamp(max=image_rows - 1)
        c = torch.arange(cols).clamp(max=image_cols - 1)
        return (r[:, None] * image_cols + c[None, :]).reshape(-1)

    def pad_guide(self, x: torch.Tensor) -> torch.Tensor:
        """(B, guide image tokens, C) raster over ``guide_image_grid`` -> (B, guide_tokens, C) raster over
        ``guide_grid``: the tokens beyond the guide image repeat its last row and column."""
        expected = self.guide_image_grid[0] * self.guide_image_grid[1]
        if x.shape[1] != expected:
            raise ValueError(f"guide of {x.shape[1]} tokens, expected the {self.guide_image_grid} guide image grid")
        return x[:, self._guide_pad_index.to(x.device)]

    # --- position ids (float32; bf16 cannot hold integers above 256 exactly) ---------------------------------
    def text_ids(self) -> torch.Tensor:
        """(text_tokens, 3) float32 zeros, FLUX's text ids."""
        return torch.zeros(self.text_tokens, 3, dtype=torch.float32)

    def hires_ids(self) -> torch.Tensor:
        """(hires_tokens, 3) float32 (0, row, col) of each hires token, in sequence (window-first) order."""
        rows, cols = self.padded_grid
        raster = self.hires_perm
        ids = torch.zeros(raster.numel(), 3, dtype=torch.float32)
        ids[:, 1] = (raster // cols).float()
        ids[:, 2] = (raster % cols).float()
        return ids

    def guide_ids(self) -> torch.Tensor:
        """(guide_tokens, 3) float32 (0, rho*m + offset, rho*n + offset) in sequence (tile-first) order: each guide
        token sits at the centre of its rho x rho footprint on the hires grid (offset (rho-1)/2 by default)."""
        if self.rho is None:
            return torch.zeros(0, 3, dtype=torch.float32)
        raster = self.guide_perm
        ids = torch.zeros(raster.numel(), 3, dtype=torch.float32)
        ids[:, 1] = (raster // self.guide_grid[1]).float() * self.rho + self.guide_offset_tokens
        ids[:, 2] = (raster % self.guide_grid[1]).float() * self.rho + self.guide_offset_tokens
        return ids

    def image_ids(self) -> torch.Tensor:
        """(hires_tokens + guide_tokens, 3) float32: the ``img_ids`` of a diffusers FLUX forward."""
        return torch.cat([self.hires_ids(), self.guide_ids()])

    # --- per-token and per-block geometry (what the policy reads) -------------------------------------------
    def token_segments(self) -> torch.Tensor:
        """(seq_tokens,) int64 Segment of every sequence position."""
        return torch.repeat_interleave(
            torch.tensor([Segment.TEXT, Segment.HIRES, Segment.GUIDE]),
            torch.tensor([self.text_tokens, self.hires_tokens, self.guide_tokens]),
        )

    def token_coords(self) -> torch.Tensor:
        """(seq_tokens, 2) int64 (row, col) of every position in its own segment's grid (text: (0, 0))."""
        coords = torch.zeros(self.seq_tokens, 2, dtype=torch.long)
        _, h0, g0, end = self.segment_offsets
        coords[h0:g0, 0] = self.hires_perm // self.padded_grid[1]
        coords[h0:g0, 1] = self.hires_perm % self.padded_grid[1]
        if self.rho is not None:
            coords[g0:end, 0] = self.guide_perm // self.guide_grid[1]
            coords[g0:end, 1] = self.guide_perm % self.guide_grid[1]
        return coords

    def block_segments(self) -> torch.Tensor:
        """(n_blocks,) int64 Segment of every block (blocks never straddle segments)."""
        return self.token_segments()[:: self.block_tokens]

    def block_rects(self) -> torch.Tensor:
        """(n_blocks, 4) int64 (row0, row1, col0, col1), inclusive bounds of each block in its segment's grid."""
        coords = self.token_coords().view(self.n_blocks, self.block_tokens, 2)
        lo, hi = coords.min(dim=1).values, coords.max(dim=1).values
        return torch.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], dim=1)


def _tiled(grid: tuple[int, int], tile: tuple[int, int]) -> tuple[int, int]:
    return _round_up(grid[0], tile[0]), _round_up(grid[1], tile[1])


GUIDE_OFFSET_HELP = ("guide token (m, n) sits at RoPE position rho*(m, n) + this, in [0, rho-1] (default: (rho-1)/2, "
                     "the centre of its footprint; the authors' code: 0). A LoRA is trained under one value")


def make_layout(
    height_px: int,
    width_px: int,
    *,
    window_tokens: int = 16,
    rho: int | None = 4,
    text_tokens: int = 512,
    block_tokens: int = 128,
    guide_offset_tokens: float | None = None,
    in_window_order: InWindowOrder | str = InWindowOrder.RASTER,
    guide_tile: tuple[int, int] | None = None,
    pad: bool = True,
) -> HierLayout:
    """Derive the whole geometry of a ``height_px`` x ``width_px`` hierarchical forward.

    ``rho``: guide downscale per axis (None: no guide). ``pad=False`` refuses sizes that need padding (training
    data, where the image is exactly the canvas). ``guide_tile`` (rows, cols) overrides the automatic choice,
    which picks the compact tile shape that needs the least padding. Raises ValueError with the rule and a fix.
    """
    _check_side("height", height_px)
    _check_side("width", width_px)
    order = InWindowOrder[in_window_order.upper()] if isinstance(in_window_order, str) else in_window_order
    _check_blocks(window_tokens, text_tokens, block_tokens, order)
    grid = (height_px // PATCH_PX, width_px // PATCH_PX)
    if rho is not None and (not isinstance(rho, int) or rho < 1 or window_tokens % rho):
        divisors = [d for d in range(2, window_tokens + 1) if window_tokens % d == 0]
        raise ValueError(
            f"rho={rho!r} must be a positive integer that divides window_tokens={window_tokens}, so that one "
            f"window covers whole guide tokens; choose one of {divisors}"
        )
    padded = _tiled(grid, (window_tokens, window_tokens))
    image = (padded[0] // rho, padded[1] // rho) if rho is not None else (0, 0)
    if rho is None:
        tile = (0, 0)
    elif guide_tile is not None:
        if guide_tile[0] * guide_tile[1] != block_tokens or min(guide_tile) < 1:
            raise ValueError(f"guide_tile={guide_tile} must hold exactly block_tokens={block_tokens} tokens")
        tile = tuple(guide_tile)
    else:  # the compact tile shape that repeats the fewest guide tokens
        tile = min(_guide_tile_shapes(block_tokens), key=lambda t: math.prod(_tiled(image, t)))
    guide = _tiled(image, tile) if rho is not None else (0, 0)
    if not pad and (padded != grid or guide != image):
        raise ValueError(_padding_refused(height_px, width_px, grid, padded, window_tokens, rho, tile, image))
    if guide_offset_tokens is None:
        guide_offset_tokens = (rho - 1) / 2 if rho is not None else 0.0
    elif rho is not None and not (isinstance(guide_offset_tokens, numbers.Real)
                                  and 0 <= guide_offset_tokens <= rho - 1):
        raise ValueError(
            f"guide_offset_tokens={guide_offset_tokens!r} must lie in [0, rho - 1] = [0, {rho - 1}] so that each guide "
            f"token's position stays inside its {rho}x{rho}-token footprint; {(rho - 1) / 2} centres it (the default), "
            f"0 puts it on the footprint's first token (the authors' convention)"
        )
    return HierLayout(
        height_px=height_px,
        width_px=width_px,
        window_tokens=window_tokens,
        rho=rho,
        text_tokens=text_tokens,
        block_tokens=block_tokens,
        in_window_order=order,
        guide_offset_tokens=float(guide_offset_tokens),
        hires_grid=grid,
        padded_grid=padded,
        guide_grid=guide,
        guide_tile=tile,
        guide_image_grid=image,
    )


def _check_blocks(window: int, text: int, block: int, order: InWindowOrder) -> None:
    if block < 1 or window < 1 or text < 0:
        raise ValueError(f"window_tokens={window}, block_tokens={block} and text_tokens={text} must be positive")
    if (window * window) % block or (order is InWindowOrder.RASTER and block % window):
        raise ValueError(
            f"a {window}x{window}-token window does not tile into whole {block}-token blocks of whole window rows "
            f"(needs window**2 % block == 0 and block % window == 0); for block {block} use a window of "
            f"{[w for w in (8, 16, 32, 64) if (w * w) % block == 0 and block % w == 0] or 'another size'}"
        )
    if order is InWindowOrder.HILBERT:
        hilbert_order(window)  # raises for non powers of two
    if text % block:
        raise ValueError(
            f"text_tokens={text} is not a multiple of block_tokens={block}; pad the prompt to "
            f"{_round_up(text, block)} tokens (diffusers' max_sequence_length)"
        )


def _padding_refused(h, w, grid, padded, window, rho, tile, image) -> str:
    if padded != grid:
        return (
            f"{w}x{h} px ({grid[1]}x{grid[0]} tokens) does not divide into whole {window}-token windows and padding "
            f"is off; use {padded[1] * PATCH_PX}x{padded[0] * PATCH_PX} px"
        )
    return (
        f"the {image[1]}x{image[0]}-token guide of {w}x{h} px (rho {rho}) does not divide into whole {tile[1]}x{tile[0]} "
        f"guide tiles and padding is off; use a size whose guide tiles exactly (e.g. sides that are multiples of "
        f"{rho * tile[1] * PATCH_PX} x {rho * tile[0] * PATCH_PX} px)"
    )
