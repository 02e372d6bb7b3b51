"""Patch crops for FID_patch and IS_patch: fixed-size crops of the full-resolution image, by one protocol for the
generated and the reference set. A box depends only on (seed, the image's index in its set, its size, the settings),
so image i of both sets, if the same size, is cropped at the same places, and a rerun crops the same pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ultragen.eval.config import PatchLayout


@dataclass(frozen=True)
class Box:
    """A crop: left/top corner and side, in pixels."""

    left_px: int
    top_px: int
    side_px: int


def patch_boxes(width_px: int, height_px: int, index: int, *, patch_px: int, layout: PatchLayout,
                patches_per_image: int | None, seed: int) -> list[Box]:
    """The crops of image ``index`` of a set. RANDOM: ``patches_per_image`` uniform positions from a generator seeded
    with (seed, index); GRID: every whole tile of a grid centred on the image. Raises ValueError if the image is
    smaller than one patch."""
    if width_px < patch_px or height_px < patch_px:
        raise ValueError(f"a {width_px}x{height_px} image is smaller than --patch-size {patch_px}; pass a smaller "
                         f"--patch-size or leave fid_patch/is_patch out of --metrics")
    if layout is PatchLayout.GRID:
        cols, rows = width_px // patch_px, height_px // patch_px
        x0, y0 = (width_px - cols * patch_px) // 2, (height_px - rows * patch_px) // 2
        return [Box(x0 + c * patch_px, y0 + r * patch_px, patch_px) for r in range(rows) for c in range(cols)]
    rng = np.random.default_rng([seed, index])
    lefts = rng.integers(0, width_px - patch_px + 1, size=patches_per_image)
    tops = rng.integers(0, height_px - patch_px + 1, size=patches_per_image)
    return [Box(int(x), int(y), patch_px) for x, y in zip(lefts, tops)]


def crop(image: torch.Tensor, boxes: list[Box]) -> torch.Tensor:
    """image [3, H, W] -> patches [len(boxes), 3, side, side] (same dtype)."""
    return torch.stack([image[:, b.top_px:b.top_px + b.side_px, b.left_px:b.left_px + b.side_px] for b in boxes])
