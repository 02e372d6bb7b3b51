"""Patch protocol of FID_patch/IS_patch: count, size, bounds, seeding, and the same boxes for both sets."""

from __future__ import annotations

import pytest
import torch

from ultragen.eval.config import PatchLayout
from ultragen.eval.patches import crop, patch_boxes


def boxes(w, h, i, seed=0, n=5, px=64, layout=PatchLayout.RANDOM):
    return patch_boxes(w, h, i, patch_px=px, layout=layout, patches_per_image=n, seed=seed)


def test_random_boxes_count_size_bounds_and_spread():
    found = boxes(300, 200, 0, n=200)
    assert len(found) == 200
    assert all(b.side_px == 64 and 0 <= b.left_px <= 300 - 64 and 0 <= b.top_px <= 200 - 64 for b in found)
    lefts, tops = {b.left_px for b in found}, {b.top_px for b in found}
    assert min(lefts) < 20 and max(lefts) > 300 - 64 - 20 and min(tops) < 20 and max(tops) > 200 - 64 - 20


def test_random_boxes_are_seeded_and_per_image():
    assert boxes(300, 200, 3, seed=7) == boxes(300, 200, 3, seed=7)  # a rerun crops the same pixels
    assert boxes(300, 200, 3, seed=7) != boxes(300, 200, 3, seed=8)
    assert boxes(300, 200, 3, seed=7) != boxes(300, 200, 4, seed=7)  # images are not all cropped alike


def test_same_protocol_for_generated_and_reference():
    """A box depends on (seed, index, size, settings) only: image i of both sets is cropped at the same places."""
    generated = [boxes(256, 256, i, seed=2) for i in range(6)]
    reference = [boxes(256, 256, i, seed=2) for i in range(6)]
    assert generated == reference


def test_grid_takes_every_whole_tile_centred():
    found = boxes(300, 200, 0, px=64, layout=PatchLayout.GRID, n=None)
    assert len(found) == 4 * 3
    assert {b.left_px for b in found} == {22 + 64 * c for c in range(4)}  # (300 - 256) / 2 = 22
    assert {b.top_px for b in found} == {4 + 64 * r for r in range(3)}  # (200 - 192) / 2 = 4
    assert boxes(300, 200, 0, px=64, layout=PatchLayout.GRID, n=None, seed=9) == found


def test_crop_cuts_the_named_pixels():
    image = torch.arange(3 * 50 * 60).reshape(3, 50, 60)
    found = boxes(60, 50, 0, px=16, n=3)
    patches = crop(image, found)
    assert patches.shape == (3, 3, 16, 16)
    for b, p in zip(found, patches):
        assert torch.equal(p, image[:, b.top_px:b.top_px + 16, b.left_px:b.left_px + 16])


def test_image_smaller_than_a_patch_is_refused():
    with pytest.raises(ValueError, match=r"a 60x50 image is smaller than --patch-size 64"):
        boxes(60, 50, 0, px=64)
