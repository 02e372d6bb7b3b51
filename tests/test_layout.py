import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultragen.layout import PATCH_PX, InWindowOrder, Segment, hilbert_order, make_layout


@pytest.mark.parametrize(
    "height, width, padded, guide",
    [
        (1024, 1024, (64, 64), (16, 16)),
        (4096, 4096, (256, 256), (64, 64)),
        (4096, 8192, (256, 512), (64, 128)),
        (2160, 3840, (144, 240), (36, 64)),
    ],
)
def test_padding_and_crop(height, width, padded, guide):
    layout = make_layout(height, width)
    assert layout.hires_grid == (height // 16, width // 16)
    assert layout.padded_grid == padded, "the canvas is padded to whole windows only"
    assert layout.guide_image_grid == (padded[0] // 4, padded[1] // 4)
    assert layout.guide_grid == guide
    assert layout.padded_height_px >= height and layout.padded_width_px >= width
    assert layout.crop_box_px() == (0, 0, height, width)
    th, tw = layout.guide_tile
    assert th * tw == 128 and guide[0] % th == 0 and guide[1] % tw == 0
    assert padded[0] % 16 == 0 and padded[1] % 16 == 0
    assert layout.seq_tokens % 128 == 0
    # a padded canvas is cropped back exactly to the requested pixels
    canvas = torch.arange(layout.padded_height_px * layout.padded_width_px).view(
        layout.padded_height_px, layout.padded_width_px
    )
    top, left, bottom, right = layout.crop_box_px()
    assert canvas[top:bottom, left:right].shape == (height, width)


@pytest.mark.parametrize("order", list(InWindowOrder))
def test_permutation_round_trip_is_exact(order):
    layout = make_layout(2160, 3840, in_window_order=order)
    x = torch.randn(2, layout.hires_tokens, 3)
    assert torch.equal(layout.hires_to_raster(layout.hires_to_sequence(x)), x)
    g = torch.randn(2, layout.guide_tokens, 3)
    assert torch.equal(layout.guide_to_raster(layout.guide_to_sequence(g)), g)
    assert torch.equal(torch.sort(layout.hires_perm).values, torch.arange(layout.hires_tokens))


@pytest.mark.parametrize("order", list(InWindowOrder))
def test_windows_are_contiguous_after_permutation(order):
    layout = make_layout(1024, 1536, in_window_order=order)
    w = layout.window_tokens
    rows, cols = layout.padded_grid
    r, c = layout.hires_perm // cols, layout.hires_perm % cols
    window = (r // w) * (cols // w) + c // w
    runs = window.view(-1, w * w)
    assert torch.equal(runs, runs[:, :1].expand_as(runs)), "a window is not one contiguous run"
    assert torch.equal(runs[:, 0], torch.arange(runs.shape[0])), "windows are not in raster order"


def test_window_first_formula_matches_authors_definition():
    layout = make_layout(512, 768, rho=None, text_tokens=0)
    rows, cols = layout.padded_grid
    w, nw = 16, cols // 16
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = ((r // w) * nw + c // w) * w * w + (r % w) * w + c % w
    assert torch.equal(layout.hires_inverse, pos.reshape(-1))


@pytest.mark.parametrize("order", list(InWindowOrder))
@pytest.mark.parametrize("size", [(1024, 1024), (2160, 3840), (4096, 2048)])
def test_every_block_is_a_compact_region_of_one_segment(size, order):
    layout = make_layout(*size, in_window_order=order)
    b = layout.block_tokens
    seg = layout.token_segments().view(-1, b)
    assert torch.equal(seg, seg[:, :1].expand_as(seg)), "a block straddles two segments"
    rects = layout.block_rects()
    area = (rects[:, 1] - rects[:, 0] + 1) * (rects[:, 3] - rects[:, 2] + 1)
    image = layout.block_segments() != Segment.TEXT
    assert torch.all(area[image] == b), "an image block is not a filled rectangle"
    hires = layout.block_segments() == Segment.HIRES
    w = layout.window_tokens
    assert torch.all(rects[hires, 0] // w == rects[hires, 1] // w) and torch.all(rects[hires, 2] // w == rects[hires, 3] // w)


def test_hilbert_order_is_a_continuous_curve():
    order = hilbert_order(16)
    r, c = order // 16, order % 16
    steps = (r[1:] - r[:-1]).abs() + (c[1:] - c[:-1]).abs()
    assert torch.all(steps == 1)
    assert torch.equal(torch.sort(order).values, torch.arange(256))


def test_position_ids_are_float32_and_guide_ids_scaled_and_centred():
    layout = make_layout(1024, 2048, rho=4)
    ids = layout.hires_ids()
    assert ids.dtype == torch.float32 and layout.guide_ids().dtype == torch.float32
    raster = layout.hires_to_raster(ids[None])[0]
    rows, cols = layout.padded_grid
    assert torch.equal(raster[:, 1], torch.arange(rows).repeat_interleave(cols).float())
    assert torch.equal(raster[:, 2], torch.arange(cols).repeat(rows).float())
    guide = layout.guide_to_raster(layout.guide_ids()[None])[0]
    gr, gc = layout.guide_grid
    assert torch.equal(guide[:, 1], torch.arange(gr).repeat_interleave(gc).float() * 4 + 1.5)
    assert torch.equal(guide[:, 2], torch.arange(gc).repeat(gr).float() * 4 + 1.5)
    # the centre of a guide token's footprint equals the mean of the hires ids it covers
    assert guide[0, 1] == raster.view(rows, cols, 3)[:4, :4, 1].mean()
    custom = make_layout(1024, 2048, rho=4, guide_offset_tokens=0.0)
    assert custom.guide_ids()[:, 1:].min() == 0 and (custom.guide_ids()[:, 1:] % 4 == 0).all()
    assert make_layout(1024, 2048, rho=4, guide_offset_tokens=np.float32(1.0)).guide_offset_tokens == 1.0
    for outside in (-0.5, 3.5, float("nan")):
        with pytest.raises(ValueError, match=r"must lie in \[0, rho - 1\] = \[0, 3\].*1\.5 centres it"):
            make_layout(1024, 2048, rho=4, guide_offset_tokens=outside)
    assert torch.equal(layout.text_ids(), torch.zeros(512, 3))


def test_large_ids_are_exact_in_float32():
    layout = make_layout(8192, 8192)
    assert layout.hires_ids()[:, 1:].max() == 511
    assert torch.equal(layout.hires_ids()[:, 1:], layout.hires_ids()[:, 1:].round())


def test_segment_offsets_and_ids_cover_the_sequence():
    layout = make_layout(2048, 2048)
    t, h, g, end = layout.segment_offsets
    assert (t, h, g, end) == (0, 512, 512 + 128 * 128, 512 + 128 * 128 + 32 * 32)
    assert layout.image_ids().shape == (end - h, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height_px=1000, width_px=1024), "not a multiple of 16"),
        (dict(height_px=0, width_px=1024), "must be positive"),
        (dict(height_px=-16, width_px=1024), "must be positive"),
        (dict(height_px=1024, width_px=65536), "above the limit"),
        (dict(height_px=1024, width_px=1024, rho=3), "divides window_tokens"),
        (dict(height_px=1024, width_px=1024, window_tokens=12), "does not tile"),
        (dict(height_px=1024, width_px=1024, window_tokens=8), "does not tile"),
        (dict(height_px=1024, width_px=1024, text_tokens=500), "not a multiple of block_tokens"),
        (dict(height_px=2160, width_px=3840, pad=False), "padding is off"),
        (dict(height_px=1024, width_px=1024, in_window_order="hilbert", window_tokens=24, block_tokens=48), "power-of-two"),
    ],
)
def test_bad_input_raises_value_error_with_the_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_layout(**kwargs)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 160),
    cols=st.integers(1, 160),
    rho=st.sampled_from([None, 2, 4, 8]),
    order=st.sampled_from(list(InWindowOrder)),
)
def test_any_multiple_of_16_px_gets_a_valid_layout(rows, cols, rho, order):
    layout = make_layout(rows * PATCH_PX, cols * PATCH_PX, rho=rho, in_window_order=order)
    pr, pc = layout.padded_grid
    assert pr >= rows and pc >= cols and pr % 16 == 0 and pc % 16 == 0
    assert pr - rows < 4 * 128 and pc - cols < 4 * 128
    assert layout.seq_tokens % layout.block_tokens == 0
    x = torch.arange(layout.hires_tokens)[None, :, None]
    assert torch.equal(layout.hires_to_raster(layout.hires_to_sequence(x)), x)
    assert pr - rows < 16 and pc - cols < 16, "only whole windows are padded"
    if rho is not None:
        assert (pr // rho, pc // rho) == layout.guide_image_grid
        th, tw = layout.guide_tile
        gr, gc = layout.guide_grid
        assert gr % th == 0 and gc % tw == 0
        assert 0 <= gr - pr // rho < th and 0 <= gc - pc // rho < tw


def test_guide_padding_repeats_the_edges_of_the_guide_image():
    layout = make_layout(2160, 3840)
    (rows, cols), (image_rows, image_cols) = layout.guide_grid, layout.guide_image_grid
    assert (rows, cols) != (image_rows, image_cols), "this size needs guide padding"
    image = torch.randn(2, image_rows * image_cols, 3)
    padded = layout.pad_guide(image).view(2, rows, cols, 3)
    original = image.view(2, image_rows, image_cols, 3)
    assert torch.equal(padded[:, :image_rows, :image_cols], original)
    assert torch.equal(padded[:, :image_rows, image_cols:], original[:, :, -1:].expand(-1, -1, cols - image_cols, -1))
    with pytest.raises(ValueError, match="guide image grid"):
        layout.pad_guide(torch.randn(1, rows * cols, 3))


def test_no_padding_mode_refuses_a_guide_that_does_not_tile():
    make_layout(1024, 1024, pad=False)
    with pytest.raises(ValueError, match="guide tiles"):
        make_layout(1024, 1536 + 256, pad=False)
