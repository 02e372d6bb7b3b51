"""Pipeline pieces on CPU: schedule arithmetic, warm start, settings, output files, tiny-random, model loading."""

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ultragen.pipeline.config import FAMILY_DEFAULTS, GenerationConfig, ModelFamily
from ultragen.pipeline.loading import MissingWeightsError, load_flux_pipeline
from ultragen.pipeline.outputs import OutputPaths, atomic_path, plan_outputs, slug
from ultragen.pipeline.schedule import hires_scheduler, warm_start_sigma
from ultragen.pipeline.tiny import tiny_flux_pipeline, tiny_tokenizers
from ultragen.pipeline.warm_start import renoise, unsharp_mask, upsample_latent, warm_start_latent

DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096)  # FLUX.1-dev's scheduler config
SCHNELL_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=False)


# --- schedule -----------------------------------------------------------------------------------------------------
def test_flux1_dev_skip_10_of_28_starts_at_sigma_0_84375():
    scheduler = hires_scheduler(FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), steps=28, skip=10)
    assert not scheduler.config.use_dynamic_shifting
    assert warm_start_sigma(28, 10, 3.0) == 0.84375  # sigma_lin = 18/28, 3 s / (1 + 2 s) = 54/64
    assert float(scheduler.sigmas[10]) == pytest.approx(0.84375, abs=1e-6)
    assert len(scheduler.timesteps[10:]) == 18
    assert float(scheduler.timesteps[10]) == pytest.approx(843.75, abs=1e-3)


@pytest.mark.parametrize("steps, skip, shift", [(28, 0, 3.0), (28, 27, 3.0), (4, 1, 1.0), (50, 17, 2.5)])
def test_closed_form_matches_the_scheduler(steps, skip, shift):
    base = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    scheduler = hires_scheduler(base, steps, skip, shift=shift)
    assert float(scheduler.sigmas[skip]) == pytest.approx(warm_start_sigma(steps, skip, shift), abs=1e-6)


def test_schnell_default_starts_at_sigma_0_75():
    d = FAMILY_DEFAULTS[ModelFamily.FLUX1_SCHNELL]
    scheduler = hires_scheduler(FlowMatchEulerDiscreteScheduler(**SCHNELL_SCHEDULER), d.steps, d.warm_start_skip)
    assert float(scheduler.sigmas[d.warm_start_skip]) == pytest.approx(0.75)
    assert len(scheduler.timesteps[d.warm_start_skip :]) == 3


def test_scheduler_positioned_at_skip_steps_from_there():
    scheduler = hires_scheduler(FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), steps=6, skip=2)
    x = torch.zeros(1, 4, 3)
    t = scheduler.timesteps[2]
    out = scheduler.step(torch.ones_like(x), t, x, return_dict=False)[0]  # Euler: x + (sigma_3 - sigma_2) * v
    expected = float(scheduler.sigmas[3] - scheduler.sigmas[2])
    torch.testing.assert_close(out, torch.full_like(x, expected))


@pytest.mark.parametrize("skip", [-1, 28, 30])
def test_skip_outside_the_schedule_is_refused(skip):
    with pytest.raises(ValueError, match="warm_start_skip"):
        hires_scheduler(FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), 28, skip)


# --- warm start -----------------------------------------------------------------------------------------------------
def test_renoise_is_the_flow_matching_interpolant():
    x, eps = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(renoise(x, eps, 0.84375), 0.15625 * x + 0.84375 * eps)


def test_unsharp_mask_is_fixed_and_keeps_flat_regions():
    x = torch.randn(1, 16, 12, 20, generator=torch.Generator().manual_seed(0))
    a, b = unsharp_mask(x, 0.5, 1.0), unsharp_mask(x, 0.5, 1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # no random sigma
    assert not torch.equal(a, x)
    torch.testing.assert_close(unsharp_mask(x, 0.0, 1.0), x, rtol=0, atol=0)
    flat = torch.full((1, 4, 9, 9), 0.3)
    torch.testing.assert_close(unsharp_mask(flat, 2.0, 1.5), flat)


def test_unsharp_mask_raises_high_frequencies():
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    smooth = upsample_latent(x[..., :8, :8], (32, 32))
    sharp = unsharp_mask(smooth, 1.0, 1.0)
    detail = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert detail(sharp) > 1.1 * detail(smooth)


def test_warm_start_latent_shape_and_noise_level():
    guide = torch.zeros(1, 16, 8, 16)
    noise = torch.randn(1, 16, 32, 64, generator=torch.Generator().manual_seed(0))
    start = warm_start_latent(guide, (32, 64), noise, 0.84375, 0.5, 1.0)
    assert start.shape == (1, 16, 32, 64)
    torch.testing.assert_close(start, 0.84375 * noise)


# --- settings -------------------------------------------------------------------------------------------------------
def test_config_resolves_family_defaults():
    dev = GenerationConfig(1024, 1024).resolved(FAMILY_DEFAULTS[ModelFamily.FLUX1_DEV])
    assert (dev.steps, dev.warm_start_skip, dev.guide_steps, dev.text_tokens) == (28, 10, 28, 512)
    schnell = GenerationConfig(1024, 1024).resolved(FAMILY_DEFAULTS[ModelFamily.FLUX1_SCHNELL])
    assert (schnell.steps, schnell.warm_start_skip, schnell.guidance_scale) == (4, 1, None)
    mine = GenerationConfig(1024, 1024, steps=20, warm_start_skip=5).resolved(FAMILY_DEFAULTS[ModelFamily.FLUX1_DEV])
    assert (mine.steps, mine.warm_start_skip) == (20, 5)


def test_guidance_on_a_model_without_guidance_embedding_is_refused():
    with pytest.raises(ValueError, match="no guidance embedding"):
        GenerationConfig(1024, 1024, guidance_scale=3.5).resolved(FAMILY_DEFAULTS[ModelFamily.FLUX1_SCHNELL])


def test_skip_beyond_the_resolved_steps_is_refused():
    with pytest.raises(ValueError, match="warm_start_skip=10 must be below steps=4"):
        GenerationConfig(1024, 1024, warm_start_skip=10).resolved(FAMILY_DEFAULTS[ModelFamily.FLUX1_SCHNELL])


@pytest.mark.parametrize("field, value, words", [
    ("height_px", 1000, "multiple of 16"),
    ("width_px", 65536, "above the limit"),
    ("width_px", 0, "positive"),
    ("rho", 3, "divides window_tokens"),
    ("rho", 1, ">= 2"),
    ("backend", "cudnn-magic", "unknown attention backend"),
    ("policy", "nope", "unknown attention policy"),
    ("seed", -1, "seed=-1"),
    ("steps", 0, "steps=0"),
    ("sharpen_strength", float("nan"), "sharpen_strength"),
    ("cascade_levels", 9, "cascade_levels=9"),
    ("text_tokens", 100, "multiple of block_tokens"),
    ("vae_tile_px", 100, "multiple of 64"),
    ("lora_path", "/nonexistent/guide.safetensors", "does not exist"),
    ("ff_chunk_tokens", 0, r"ff_chunk_tokens=0 must be a whole number >= 1"),
    ("ff_chunk_tokens", 2.5, r"ff_chunk_tokens=2.5 must be a whole number"),
    ("ff_chunk_tokens", True, r"ff_chunk_tokens=True must be a whole number"),
])
def test_bad_settings_raise_with_the_value(field, value, words):
    with pytest.raises(ValueError, match=words):
        GenerationConfig(**{"height_px": 1024, "width_px": 1024, field: value})


def test_cascade_levels_chain_outputs_into_guides():
    config = GenerationConfig(2160, 3840, cascade_levels=3, rho=2)
    layouts = config.layouts()
    assert (layouts[-1].height_px, layouts[-1].width_px) == (2160, 3840)
    for inner, outer in zip(layouts, layouts[1:]):
        assert (inner.height_px, inner.width_px) == (outer.guide_height_px, outer.guide_width_px)
    assert config.guide_size_px == (layouts[0].guide_height_px, layouts[0].guide_width_px)


def test_record_round_trips_and_unknown_keys_fail():
    config = GenerationConfig(512, 768, model="tiny-random", seed=7, steps=3)
    assert GenerationConfig.from_record(config.to_record()) == config
    with pytest.raises(ValueError, match="unknown generation settings"):
        GenerationConfig.from_record({**config.to_record(), "cfg_scale": 2})


# --- output files ---------------------------------------------------------------------------------------------------
def test_output_names(tmp_path):
    one = plan_outputs(tmp_path / "fox.png", ["a fox"], [0], force=False)
    assert one == [OutputPaths(tmp_path / "fox.png", tmp_path / "fox.json", tmp_path / "fox.latent.safetensors")]
    many = plan_outputs(tmp_path / "out", ["A red fox!", "a cat"], [3, 4], force=False)
    assert [p.image.name for p in many] == ["000-a-red-fox-s3.png", "001-a-cat-s4.png"]
    assert not (tmp_path / "out").exists()  # planning creates nothing
    assert slug("???") == "image"


def test_existing_file_needs_force(tmp_path):
    (tmp_path / "fox.json").write_text("{}")
    with pytest.raises(ValueError, match="already exists"):
        plan_outputs(tmp_path / "fox.png", ["a fox"], [0], force=False)
    plan_outputs(tmp_path / "fox.png", ["a fox"], [0], force=True)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.png") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("out of memory")
    assert list(tmp_path.iterdir()) == []


# --- tiny-random and loading ----------------------------------------------------------------------------------------
def test_tiny_tokenizers_are_local_and_prompt_dependent():
    clip, t5 = tiny_tokenizers()
    a = t5("a red fox", padding="max_length", max_length=16, return_tensors="pt").input_ids
    b = t5("a red cat", padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert a.shape == (1, 16) and not torch.equal(a, b)
    assert clip("a red fox").input_ids[-1] == clip.eos_token_id


def test_tiny_random_is_the_same_every_time():
    a, b = tiny_flux_pipeline(), tiny_flux_pipeline()
    for m1, m2 in [(a.transformer, b.transformer), (a.vae, b.vae), (a.text_encoder_2, b.text_encoder_2)]:
        for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
            assert torch.equal(p1, p2), name


def test_missing_hub_model_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as info:
        load_flux_pipeline("black-forest-labs/FLUX.1-dev")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "hf download black-forest-labs/FLUX.1-dev" in message and "HF_HUB_OFFLINE=1" in message


def test_missing_local_folder_says_so(tmp_path):
    with pytest.raises(MissingWeightsError, match="no folder"):
        load_flux_pipeline(str(tmp_path / "flux-dev"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="no model_index.json"):
        load_flux_pipeline(str(tmp_path / "empty"))


def test_replace_revalidates():
    config = GenerationConfig(512, 512)
    with pytest.raises(ValueError, match="multiple of 16"):
        replace(config, width_px=500)


def test_lora_expectation_records_a_local_model_folder_as_training_does(tmp_path, monkeypatch):
    """A LoRA trained on ./flux-dev must be accepted by a run given the same folder by another path."""
    from ultragen.pipeline.loading import normalise_model

    folder = tmp_path / "flux-dev"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    config = GenerationConfig(height_px=1024, width_px=1024)
    trained = normalise_model("./flux-dev")
    assert config.lora_expectation(str(folder)).base_model == trained
    assert config.lora_expectation("flux-dev/").base_model == trained
    assert config.lora_expectation("black-forest-labs/FLUX.1-dev").base_model == "black-forest-labs/FLUX.1-dev"


def test_window_first_latents_come_back_to_the_requested_top_left_region():
    """Canvas latents -> pack -> window-first -> raster -> unpack -> crop returns exactly the requested region."""
    from ultragen.layout import make_layout
    from ultragen.pipeline.latents import pack, unpack
    from ultragen.pipeline.two_stage import _crop

    layout = make_layout(544, 960)  # padded on the right and at the bottom
    assert layout.padded_grid != layout.hires_grid
    canvas = torch.randn(1, 16, layout.padded_grid[0] * 2, layout.padded_grid[1] * 2)
    sequence = layout.hires_to_sequence(pack(canvas))
    back = _crop(unpack(layout.hires_to_raster(sequence), layout.padded_height_px, layout.padded_width_px), layout)
    assert back.shape[-2:] == (layout.height_px // 8, layout.width_px // 8)
    assert torch.equal(back, canvas[:, :, : layout.height_px // 8, : layout.width_px // 8])


def test_a_policy_file_is_a_setting_and_what_a_lora_must_match(tmp_path):
    path = tmp_path / "halo0.json"
    path.write_text('{"base": "default", "hires_halo_tokens": 0}')
    config = GenerationConfig(height_px=512, width_px=512, policy=str(path))
    assert config.lora_expectation("tiny-random").policy["hires_halo_tokens"] == 0
    with pytest.raises(ValueError, match="does not exist"):
        GenerationConfig(height_px=512, width_px=512, policy=str(tmp_path / "nope.json"))


def test_guide_offset_reaches_every_cascade_layout_and_the_lora_expectation():
    config = GenerationConfig(4096, 4096, cascade_levels=2, guide_offset_tokens=0.0)
    assert [layout.guide_offset_tokens for layout in config.layouts()] == [0.0, 0.0]
    assert config.lora_expectation("tiny").guide_offset_tokens == 0.0
    assert GenerationConfig(1024, 1024).lora_expectation("tiny").guide_offset_tokens == 1.5  # centred, rho 4
    with pytest.raises(ValueError, match=r"guide_offset_tokens=4.0 must lie in \[0, rho - 1\] = \[0, 3\]"):
        GenerationConfig(1024, 1024, guide_offset_tokens=4.0)


# --- stage B's real warm start, against an independent computation ------------------------------------------------
def _stock_flux_sigma(steps: int, skip: int, shift: float) -> float:
    """The sigma at step ``skip`` of the N-step schedule FluxPipeline sets up (``sigmas=linspace(1, 1/N, N)``) on a
    stock diffusers scheduler with a static shift: what stage B must start from."""
    stock = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    stock.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    return float(stock.sigmas[skip])


def _reference_warm_start(guide, size, noise, sigma, strength, blur_sigma):
    """docs: bicubic upsample (exactly rho x) -> x + strength * (x - gaussian_blur(x)) -> (1 - sigma) x + sigma noise.
    The blur here is one 2D kernel (not separable), radius ceil(3 sigma), reflect padding."""
    up = torch.nn.functional.interpolate(guide.double(), size=size, mode="bicubic", align_corners=False)
    radius = math.ceil(3 * blur_sigma)
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * blur_sigma**2))
    kernel = kernel / kernel.sum()
    c = up.shape[1]
    padded = torch.nn.functional.pad(up, (radius,) * 4, mode="reflect")
    blurred = torch.nn.functional.conv2d(padded, kernel.expand(c, 1, -1, -1).contiguous(), groups=c)
    sharp = up + strength * (up - blurred)
    return ((1 - sigma) * sharp + sigma * noise.double()).float()


def test_stage_b_starts_from_the_sharpened_guide_renoised_to_the_schedules_sigma(monkeypatch):
    """The first hires input stage B feeds the transformer is the warm start of the (non-zero) guide, computed here
    independently, at the sigma of step k of the stock scheduler; the sigma stage B reports is that one."""
    import ultragen.pipeline.two_stage as two_stage
    from ultragen.flux import HierFluxTransformer
    from ultragen.layout import make_layout
    from ultragen.pipeline.latents import pack
    from ultragen.pipeline.two_stage import UltraGenPipeline

    first_inputs, noises = [], []
    forward, draw = HierFluxTransformer.forward, two_stage.randn_tensor

    def recording(self, hires, *args, **kwargs):
        first_inputs.append(hires.clone())
        return forward(self, hires, *args, **kwargs)

    def recording_noise(*args, **kwargs):
        noises.append(draw(*args, **kwargs))
        return noises[-1]

    monkeypatch.setattr(HierFluxTransformer, "forward", recording)
    monkeypatch.setattr(two_stage, "randn_tensor", recording_noise)
    pipe = UltraGenPipeline.from_pretrained("tiny-random", dtype=torch.float32)
    steps, skip, strength, blur = 5, 2, 0.7, 1.3
    out = pipe("a red fox", 256, 256, num_inference_steps=steps, warm_start_skip=skip, guide_steps=2,
               sharpen_strength=strength, sharpen_sigma_latent_px=blur, output_type="latent", progress=False,
               generator=torch.Generator().manual_seed(3))
    assert len(first_inputs) == steps - skip
    sigma = _stock_flux_sigma(steps, skip, 3.0)
    assert 0.6 < sigma < 0.95  # not 1 - sigma: the mutation this catches
    assert out.warm_start_sigmas == pytest.approx((sigma,), abs=1e-6)
    assert pipe.last_warm_start_sigmas == out.warm_start_sigmas
    guide = out.guide_latents
    assert guide.abs().mean() > 0.1  # a real guide: a guide multiplied by 0 would be caught
    layout = make_layout(256, 256)
    canvas = (layout.padded_grid[0] * 2, layout.padded_grid[1] * 2)
    (noise,) = noises  # stage A draws through diffusers, not through two_stage.randn_tensor
    expected = _reference_warm_start(guide, canvas, noise, sigma, strength, blur)
    torch.testing.assert_close(first_inputs[0], layout.hires_to_sequence(pack(expected)), rtol=1e-5, atol=1e-5)


def test_each_cascade_level_reports_the_sigma_its_scheduler_started_from():
    from ultragen.pipeline.two_stage import UltraGenPipeline

    pipe = UltraGenPipeline.from_pretrained("tiny-random", dtype=torch.float32)
    out = pipe("a red fox", 512, 512, num_inference_steps=4, warm_start_skip=1, guide_steps=2, rho=2,
               cascade_levels=2, output_type="latent", progress=False)
    assert out.warm_start_sigmas == pytest.approx((_stock_flux_sigma(4, 1, 3.0),) * 2, abs=1e-6)


def test_a_guide_of_the_wrong_size_is_a_value_error_not_an_assert():
    from ultragen.layout import make_layout
    from ultragen.pipeline.two_stage import UltraGenPipeline

    pipe = UltraGenPipeline.from_pretrained("tiny-random", dtype=torch.float32)
    config = pipe.make_config(None, 256, 256, 3, guide_steps=2, warm_start_skip=1)
    with pytest.raises(ValueError, match=r"does not fit the layout: it must be \(B, C, 8, 8\)"):
        pipe._stage_b(None, torch.zeros(1, 4, 6, 8), make_layout(256, 256), None, config, None, False)
