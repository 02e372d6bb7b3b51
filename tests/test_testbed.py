"""Testbed: scenes, captions, latent transform, text encoder, detector and metrics, model config (CPU, fast)."""

import numpy as np
import pytest
import torch

from ultragen.testbed.latent import LatentCodec, from_tokens, to_tokens
from ultragen.testbed.metrics import (
    detail_ratio,
    detect,
    guide_psnr,
    high_frequency_energy,
    psnr_db,
    score,
    seam_ratio,
    to_tensor,
)
from ultragen.testbed.model import PRESETS, TestbedConfig, raster_ids
from ultragen.testbed.scenes import (
    Background,
    Colour,
    Scene,
    SceneObject,
    Shape,
    parse_caption,
    render,
    sample_scene,
)
from ultragen.testbed.text import SceneTextEncoder

SEEDS = range(12)


def _structure(scene: Scene):
    return [(o.shape, o.colour, o.cell) for o in scene.objects], (scene.background.tone, scene.background.texture)


def test_scene_is_deterministic_and_varied():
    assert [sample_scene(s) for s in SEEDS] == [sample_scene(s) for s in SEEDS]
    assert len({sample_scene(s).caption for s in SEEDS}) == len(SEEDS)
    counts = {len(sample_scene(s).objects) for s in range(60)}
    assert counts == {1, 2, 3, 4}


@pytest.mark.parametrize("seed", SEEDS)
def test_caption_parses_back_to_the_scene(seed):
    scene = sample_scene(seed)
    assert _structure(parse_caption(scene.caption)) == _structure(scene)


def test_caption_groups_and_counts():
    scene = Scene((SceneObject("circle", "red", 0), SceneObject("circle", "red", 4), SceneObject("square", "blue", 8)),
                  Background("dark", "striped"))
    assert scene.caption == "two red circles at top left and center, a blue square at bottom right, on a striped dark background"


@pytest.mark.parametrize("text, words", [
    ("a red circle at top, on a pink background", "'pink'"),
    ("two red circles at top, on a grey background", "count 2"),
    ("a red circle at top", "must end with"),
    ("a red hexagon at top, on a grey background", "'hexagon'"),
])
def test_bad_captions_explain(text, words):
    with pytest.raises(ValueError, match=words):
        parse_caption(text)


def test_scene_rejects_shared_cells_and_escaping_objects():
    with pytest.raises(ValueError, match="own cell"):
        Scene((SceneObject("circle", "red", 1), SceneObject("square", "red", 1)))
    with pytest.raises(ValueError, match="leaves cell"):
        SceneObject("triangle", "red", 1, size=0.12, offset=(0.05, 0.0))


@pytest.mark.parametrize("seed", [0, 5])
def test_render_at_base_and_4x_agree(seed):
    scene = sample_scene(seed)
    base, big = render(scene, 64), render(scene, 256)
    down = big.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    psnr = psnr_db(torch.from_numpy(base), torch.from_numpy(down))
    assert psnr > 35, f"base vs downsampled 4x render: {psnr:.1f} dB"
    same_samples = render(scene, 64, supersample=16)  # the very sample points of the 4x render
    np.testing.assert_allclose(same_samples, down, rtol=0, atol=1e-6)
    assert base.dtype == np.float32 and base.min() >= 0 and base.max() <= 1


@pytest.mark.parametrize("token_px", [1, 2, 4])
def test_latent_round_trips(token_px):
    codec = LatentCodec(token_px)
    image = torch.rand(2, 3, 8 * token_px, 12 * token_px)
    latent = codec.encode(image)
    assert latent.shape == (2, 3 * token_px**2, 8, 12)
    torch.testing.assert_close(codec.decode(latent), image, rtol=0, atol=2e-6)
    mix = codec.mix
    torch.testing.assert_close(mix @ mix.T, torch.eye(codec.channels, dtype=mix.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(from_tokens(to_tokens(latent), (8, 12)), latent, rtol=0, atol=0)


def test_latent_channel_zero_is_mean_luma():
    codec = LatentCodec(4)
    image = torch.full((1, 3, 8, 8), 0.75)
    latent = codec.encode(image)
    assert torch.allclose(latent[:, 0], torch.full_like(latent[:, 0], 0.5 * 3**0.5))
    assert latent[:, 1:].abs().max() < 1e-6


def test_text_encoder_reads_the_structure():
    enc = SceneTextEncoder(text_tokens=16, joint_dim=32, pooled_dim=32)
    captions = [sample_scene(s).caption for s in range(4)] + [""]
    out = enc(captions)
    assert out.embeds.shape == (5, 16, 32) and out.pooled.shape == (5, 32)
    assert len({tuple(e.flatten().tolist()) for e in out.embeds}) == 5
    assert out.pooled[-1].abs().sum() == 0 and out.embeds[-1, :, 2].eq(1).all()
    same = enc.encode_scenes([parse_caption(captions[0])])
    torch.testing.assert_close(same.embeds[0], out.embeds[0])
    with pytest.raises(ValueError, match="at least"):
        SceneTextEncoder(joint_dim=8)


@pytest.mark.parametrize("size_px", [64, 128, 512])
def test_detector_is_perfect_on_clean_renders(size_px):
    scenes = [sample_scene(s) for s in SEEDS] if size_px < 512 else [sample_scene(s) for s in SEEDS[:3]]
    found = [detect(to_tensor(render(s, size_px, supersample=4 if size_px < 512 else 1))) for s in scenes]
    scores = score(scenes, found)
    assert (scores.count_acc, scores.color_acc, scores.position_acc) == (1.0, 1.0, 1.0), scores


def test_detector_scores_drop_on_corrupted_images():
    scenes = [sample_scene(s) for s in SEEDS]
    images = [to_tensor(render(s, 64)) for s in scenes]
    shuffled = score(scenes, [detect(im) for im in images[1:] + images[:1]])
    g = torch.Generator().manual_seed(0)
    noisy = score(scenes, [detect((im + 0.5 * torch.randn(im.shape, generator=g)).clamp(0, 1)) for im in images])
    blank = score(scenes, [detect(torch.full_like(im, 0.45)) for im in images])
    for name, s in [("shuffled", shuffled), ("noisy", noisy), ("blank", blank)]:
        assert s.count_acc < 0.5 and s.position_acc < 0.5, f"{name}: {s}"
    assert blank.color_acc == 0


def test_detector_shapes():
    scene = Scene((SceneObject(Shape.CIRCLE, Colour.RED, 0), SceneObject(Shape.SQUARE, Colour.RED, 4),
                   SceneObject(Shape.TRIANGLE, Colour.RED, 8)))
    found = {(d.shape, d.cell) for d in detect(to_tensor(render(scene, 128)))}
    assert found == {(Shape.CIRCLE, 0), (Shape.SQUARE, 4), (Shape.TRIANGLE, 8)}


def test_seam_ratio_is_one_without_seams_and_grows_with_a_grid():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 13, 13, generator=g), 128, mode="bicubic")
    noisy = torch.rand(2, 3, 128, 128, generator=g)
    for image in (smooth, noisy):
        assert abs(seam_ratio(image, 16) - 1) < 0.1, seam_ratio(image, 16)
    per_window = 0.03 * torch.randn(2, 3, 8, 8, generator=g)  # each 16-px window slightly off
    gridded = smooth + per_window.repeat_interleave(16, -1).repeat_interleave(16, -2)
    assert seam_ratio(gridded, 16) > 1.5, seam_ratio(gridded, 16)
    per_token = 0.03 * torch.randn(2, 3, 32, 32, generator=g)  # blocky 4-px tokens, no window seams
    blocky = smooth + per_token.repeat_interleave(4, -1).repeat_interleave(4, -2)
    assert abs(seam_ratio(blocky, 16, token_px=4) - 1) < 0.15, seam_ratio(blocky, 16, token_px=4)
    assert seam_ratio(gridded + blocky - smooth, 16, token_px=4) > 1.3
    clean = torch.stack([to_tensor(render(sample_scene(s), 128)) for s in SEEDS])
    assert 0.7 < seam_ratio(clean, 16) < 1.3


def test_detail_ratio_is_one_for_the_truth_low_for_an_upsample_high_for_noise():
    scenes = [sample_scene(s) for s in range(4)]
    truth = torch.stack([to_tensor(render(s, 256, supersample=2)) for s in scenes])
    assert detail_ratio(truth, truth, 4) == pytest.approx(1.0)
    assert detail_ratio(truth * 0.5, high_frequency_energy(truth, 4), 4) == pytest.approx(0.25)
    small = torch.stack([to_tensor(render(s, 64, supersample=2)) for s in scenes])
    upsampled = torch.nn.functional.interpolate(small, size=256, mode="bicubic", align_corners=False)
    assert guide_psnr(upsampled, small) > 25  # the upsample is faithful to the guide ...
    assert detail_ratio(upsampled, truth, 4) < 0.5  # ... but carries little of the detail
    noisy = (truth + 0.2 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert detail_ratio(noisy, truth, 4) > 1.5
    with pytest.raises(ValueError, match="divide the image size"):
        detail_ratio(truth[..., :250, :250], truth[..., :250, :250], 4)


def test_guide_psnr():
    scene = sample_scene(3)
    big, small = to_tensor(render(scene, 128))[None], to_tensor(render(scene, 32))[None]
    assert guide_psnr(big, small) > 35
    assert guide_psnr(big, to_tensor(render(sample_scene(4), 32))[None]) < 25


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_testbed_layouts_tile_without_padding(name):
    cfg = PRESETS[name]
    for scale in (1, 4):
        layout = cfg.layout(scale)
        assert layout.padded_grid == layout.hires_grid == (cfg.base_tokens * scale,) * 2
    assert cfg.layout(4).guide_grid == (cfg.base_tokens, cfg.base_tokens)  # the 4x guide is a base image


def test_config_errors_teach():
    with pytest.raises(ValueError, match="sum to head_dim"):
        TestbedConfig(head_dim=16)
    with pytest.raises(ValueError, match="multiple of window_tokens"):
        TestbedConfig(base_tokens=36)
    cfg = PRESETS["cpu-tiny"]
    assert TestbedConfig.from_dict(cfg.to_dict()) == cfg


def test_tiny_model_forward():
    cfg = PRESETS["cpu-tiny"]
    model = cfg.build_model().eval()
    n = cfg.base_tokens
    prompt = cfg.text_encoder()([sample_scene(0).caption])
    with torch.no_grad():
        out = model(hidden_states=torch.randn(1, n * n, cfg.codec().channels), encoder_hidden_states=prompt.embeds,
                    pooled_projections=prompt.pooled, timestep=torch.tensor([0.5]), img_ids=raster_ids(n, n),
                    txt_ids=torch.zeros(cfg.text_tokens, 3)).sample
    assert out.shape == (1, n * n, cfg.codec().channels) and torch.isfinite(out).all()


def test_the_policy_variants_of_the_gpu_sweep_load_and_differ():
    from pathlib import Path

    from ultragen.policy import build_plan

    files = sorted((Path(__file__).parents[1] / "bench" / "testbed_policies").glob("*.json"))
    layout = PRESETS["base"].layout(4)
    blocks = {f.stem: int(build_plan(layout, str(f)).kv_counts.sum()) for f in files}
    assert len(files) >= 5 and blocks["halo0"] < blocks["margin0"] < int(build_plan(layout).kv_counts.sum())
    assert len(set(blocks.values())) == len(blocks)  # every variant is a different attention pattern
