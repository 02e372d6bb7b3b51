"""Testbed training (resumable, deterministic), sampling with every strategy, evaluation and the CLI (CPU)."""

import dataclasses
import json

import pytest
import torch

from ultragen.cli import main
from ultragen.flux.lora import LoraTargets, read_lora_metadata
from ultragen.testbed.evaluate import EvalSettings, evaluate, sample_grid
from ultragen.testbed.model import TestbedConfig
from ultragen.testbed.sample import SamplerSettings, Strategy, sample_base, sample_hires
from ultragen.testbed.scenes import sample_scene
from ultragen.testbed.train import TrainSettings, load_ema, loss_curve, train

MICRO = TestbedConfig(name="micro", base_tokens=8, token_px=2, window_tokens=4, block_tokens=16, rho=2,
                      text_tokens=16, layers=1, single_layers=1, heads=2, head_dim=16, axes_dims_rope=(4, 6, 6))
SETTINGS = TrainSettings(steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1, supersample=1)


def _quiet(_line: str) -> None:
    pass


def test_resumed_run_equals_uninterrupted(tmp_path):
    train(MICRO, SETTINGS, tmp_path / "a", progress=False, log=_quiet)
    stopped = TrainSettings(**{**SETTINGS.__dict__, "steps": 2})
    train(MICRO, stopped, tmp_path / "b", progress=False, log=_quiet)
    assert load_ema(tmp_path / "b")[2] == 2
    train(MICRO, SETTINGS, tmp_path / "b", progress=False, log=_quiet)
    (_, a, step_a), (_, b, step_b) = load_ema(tmp_path / "a"), load_ema(tmp_path / "b")
    assert step_a == step_b == 4
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    assert [r["step"] for r in loss_curve(tmp_path / "a")] == [1, 2, 3, 4]
    assert (tmp_path / "a" / "model" / "transformer" / "config.json").exists()


def test_resume_refuses_another_config(tmp_path):
    train(MICRO, TrainSettings(steps=1, batch_size=1, supersample=1), tmp_path, progress=False, log=_quiet)
    with pytest.raises(ValueError, match="same preset"):
        train(TestbedConfig(**{**MICRO.to_dict(), "layers": 2}), SETTINGS, tmp_path, progress=False, log=_quiet)


@pytest.mark.parametrize("strategy", list(Strategy)[:3])
@pytest.mark.parametrize("warm", [False, True])
def test_every_strategy_samples_a_hires_latent(strategy, warm):
    model = MICRO.build_model().eval()
    enc = MICRO.text_encoder()
    prompt, empty = enc.encode_scenes([sample_scene(0)]), enc.encode_scenes([None])
    settings = SamplerSettings(steps=3, warm_start_skip=1, backend="reference")
    c, n = MICRO.codec().channels, MICRO.base_tokens
    guide = sample_base(model, MICRO, prompt, empty, torch.randn(1, c, n, n), settings)
    out = sample_hires(model, MICRO, strategy, warm, guide, prompt, empty, torch.randn(1, c, 2 * n, 2 * n), settings,
                       scale=2).latents
    assert out.shape == (1, c, 2 * n, 2 * n) and torch.isfinite(out).all()


def test_evaluate_writes_every_row(tmp_path):
    train(MICRO, TrainSettings(steps=1, batch_size=1, supersample=1), tmp_path, progress=False, log=_quiet)
    settings = EvalSettings(prompts=2, batch_size=2, scale=2, sampler=SamplerSettings(steps=2, warm_start_skip=1))
    record, images = evaluate(tmp_path, settings, progress=False, log=_quiet)
    assert record["base"].keys() == {"count_acc", "color_acc", "position_acc"}
    assert [(r["strategy"], r["warm_start"]) for r in record["rows"]] == [
        (s.value, w) for s in list(Strategy)[:3] for w in (False, True)]
    warm_sigma = _stock_sigma(steps=2, skip=1, shift=settings.sampler.hires_shift)
    assert [(r["start_sigma"], r["steps_run"]) for r in record["rows"]] == [(1.0, 2), (warm_sigma, 1)] * 3
    assert record["missing"] and "lora" in record["missing"][0]
    assert all(0 < r["detail_ratio"] < float("inf") for r in record["rows"])
    assert 0 < record["reference"]["upsampled_base_detail_ratio"] < float("inf")
    json.dumps(record)
    assert sample_grid(images, 2).size == (2 * (16 * 2 + 4), 7 * (16 * 2 + 4))
    with pytest.raises(ValueError, match="must equal the testbed's rho"):
        evaluate(tmp_path, EvalSettings(prompts=1, scale=4), progress=False)


def test_evaluate_cache_rows_against_the_uncached_row(tmp_path, capsys):
    """--cache off fbcache:0 fbcache:1e6: threshold 0 is the uncached row bit for bit (PSNR inf, nothing skipped);
    a huge threshold skips every step after the first and the row says so; a bad setting exits 2 in one line."""
    train(MICRO, TrainSettings(steps=1, batch_size=1, supersample=1), tmp_path, progress=False, log=_quiet)
    settings = EvalSettings(prompts=2, batch_size=2, scale=2, strategies=(Strategy.GUIDE,),
                            cache_strategy=Strategy.GUIDE, caches=("off", "fbcache:0", "fbcache:1e6"),
                            sampler=SamplerSettings(steps=4, warm_start_skip=1))
    record, images = evaluate(tmp_path, settings, progress=False, log=_quiet)
    cold, off, zero, huge = record["rows"]
    assert [(r["strategy"], r["warm_start"], r["cache"]) for r in record["rows"]] == [
        ("windows+guide", False, "off"), ("windows+guide", True, "off"), ("windows+guide", True, "fbcache:0"),
        ("windows+guide", True, "fbcache:1e+06")]
    assert torch.equal(images["windows+guide +warm cache=fbcache:0"], images["windows+guide +warm"])
    assert {k: v for k, v in zero.items() if k != "cache"} == {k: v for k, v in off.items() if k != "cache"}
    assert off["psnr_vs_uncached"] == zero["psnr_vs_uncached"] == float("inf")
    assert (off["steps_computed"], off["steps_skipped"], zero["steps_skipped"]) == (3, 0, 0)  # 4 steps, 1 warm-skipped
    assert (huge["steps_computed"], huge["steps_skipped"]) == (1, 2)  # one batch: the first step computes
    assert 0 < huge["psnr_vs_uncached"] < float("inf")
    assert not torch.equal(images["windows+guide +warm cache=fbcache:1e+06"], images["windows+guide +warm"])
    assert record["settings"]["caches"] == ["off", "fbcache:0", "fbcache:1e+06"]
    json.dumps(record)
    assert main(["testbed", "eval", "--run-dir", str(tmp_path), "--cache", "off", "fbcache:abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'abc'" in err and "fbcache:0.08" in err and len(err.splitlines()) == 1


def test_cli_testbed_data(tmp_path, capsys):
    assert main(["testbed", "data", "--out", str(tmp_path), "--count", "3", "--size", "32", "--scales", "1", "4"]) == 0
    lines = (tmp_path / "scenes.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["caption"] == sample_scene(0).caption
    assert (tmp_path / "0000000002@4x.png").exists() and (tmp_path / "0000000002.txt").exists()
    assert main(["testbed", "data", "--out", str(tmp_path), "--count", "1"]) == 2
    assert "already holds" in capsys.readouterr().err


def test_guide_lora_chain_on_testbed_data(tmp_path):
    """testbed train -> testbed lora-cache -> ultragen train (the guide LoRA) -> testbed eval with the LoRA row."""
    run, cache, lora_run = tmp_path / "run", tmp_path / "cache", tmp_path / "lora"
    train(MICRO, TrainSettings(steps=1, batch_size=1, supersample=1), run, progress=False, log=_quiet)
    assert main(["testbed", "lora-cache", "--run-dir", str(run), "--out", str(cache), "--count", "4"]) == 0
    assert main(["train", "--model", str(run / "model"), "--cache", str(cache), "--out", str(lora_run),
                 "--steps", "1", "--val-items", "1"]) == 0
    settings = EvalSettings(prompts=1, batch_size=1, scale=2, lora_path=str(lora_run / "guide_lora.safetensors"),
                            sampler=SamplerSettings(steps=2, warm_start_skip=1))
    record, _ = evaluate(run, settings, progress=False, log=_quiet)
    assert [r["strategy"] for r in record["rows"]][-2:] == ["windows+guide+lora"] * 2 and not record["missing"]
    assert record["settings"]["policy"]["name"] == "default"
    assert read_lora_metadata(lora_run / "guide_lora.safetensors").targets is LoraTargets.WIDE  # the default
    other = dataclasses.replace(settings, sampler=SamplerSettings(steps=2, warm_start_skip=1, policy="authors-code"))
    mismatch = r"other settings than this evaluation \(policy\.guide_margin_tokens: LoRA None, run \[0, 4\]"
    with pytest.raises(ValueError, match=mismatch):
        evaluate(run, other, progress=False, log=_quiet)  # a LoRA is evaluated only under the policy it learnt
    with pytest.raises(ValueError, match="unknown attention policy 'wide'"):
        SamplerSettings(policy="wide")  # before any model loads


def test_cli_strategy_names_match_the_enum():
    from ultragen.cli import TESTBED_STRATEGIES
    from ultragen.testbed.sample import Strategy

    assert TESTBED_STRATEGIES == tuple(s.value for s in Strategy)


def test_lora_cache_rendered_by_workers_equals_in_process(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ultragen.testbed import lora_data
    from ultragen.testbed.lora_data import write_lora_cache

    pools = []

    class SpyPool(lora_data.ProcessPoolExecutor):
        def __init__(self, workers):
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(lora_data, "ProcessPoolExecutor", SpyPool)

    run = tmp_path / "run"
    train(MICRO, TrainSettings(steps=1, batch_size=1, supersample=1), run, progress=False, log=_quiet)
    for name, workers in (("serial", 0), ("pool", 2)):
        assert list(write_lora_cache(run, tmp_path / name, count=5, batch=3, shard_items=2, workers=workers)) == [3, 5]
    assert pools == [2]  # only the second cache used a pool (of at most a batch of processes)
    shards = sorted(p.name for p in (tmp_path / "serial").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "pool").glob("*.safetensors")) and len(shards) >= 3
    for shard in shards:
        serial, pool = load_file(tmp_path / "serial" / shard), load_file(tmp_path / "pool" / shard)
        assert serial.keys() == pool.keys() and all(torch.equal(serial[k], pool[k]) for k in serial)
    with pytest.raises(ValueError, match="workers=-1"):
        next(write_lora_cache(run, tmp_path / "bad", count=1, workers=-1))


def test_guide_offset_is_trained_recorded_and_required_at_eval(tmp_path):
    run, cache, lora_run = tmp_path / "run", tmp_path / "cache", tmp_path / "lora"
    train(MICRO, TrainSettings(steps=1, batch_size=1, supersample=1), run, progress=False, log=_quiet)
    assert main(["testbed", "lora-cache", "--run-dir", str(run), "--out", str(cache), "--count", "3"]) == 0
    assert main(["train", "--model", str(run / "model"), "--cache", str(cache), "--out", str(lora_run), "--steps", "1",
                 "--val-items", "1", "--guide-offset-tokens", "0", "--quiet"]) == 0
    lora = str(lora_run / "guide_lora.safetensors")
    assert read_lora_metadata(lora).guide_offset_tokens == 0.0  # MICRO's rho 2 would centre at 0.5
    settings = EvalSettings(prompts=1, batch_size=1, scale=2, lora_path=lora, strategies=("windows+guide+lora",),
                            sampler=SamplerSettings(steps=2, warm_start_skip=1))
    with pytest.raises(ValueError, match=r"guide_offset_tokens: LoRA 0\.0, run 0\.5"):
        evaluate(run, settings, progress=False, log=_quiet)
    at_zero = dataclasses.replace(settings, sampler=SamplerSettings(steps=2, warm_start_skip=1, guide_offset_tokens=0))
    record, _ = evaluate(run, at_zero, progress=False, log=_quiet)
    assert len(record["rows"]) == 2 and record["settings"]["guide_offset_tokens"] == 0
    defaults = dataclasses.replace(settings, lora_path=None, strategies=("windows+guide",))
    assert evaluate(run, defaults, progress=False, log=_quiet)[0]["settings"]["guide_offset_tokens"] == 0.5
    with pytest.raises(ValueError, match=r"must lie in \[0, rho - 1\] = \[0, 1\]"):
        evaluate(run, dataclasses.replace(settings, sampler=SamplerSettings(guide_offset_tokens=1.5)), progress=False,
                 log=_quiet)


def test_guide_offset_moves_the_guide_tokens_of_a_sample():
    model = MICRO.build_model().eval()
    enc = MICRO.text_encoder()
    prompt, empty = enc.encode_scenes([sample_scene(0)]), enc.encode_scenes([None])
    c, n = MICRO.codec().channels, MICRO.base_tokens
    g = torch.Generator().manual_seed(0)
    guide, noise = torch.randn(1, c, n, n, generator=g), torch.randn(1, c, 2 * n, 2 * n, generator=g)
    outs = [sample_hires(model, MICRO, Strategy.GUIDE, False, guide, prompt, empty, noise,
                         SamplerSettings(steps=2, warm_start_skip=1, backend="reference", guide_offset_tokens=offset),
                         scale=2).latents for offset in (None, 0.5, 0.0)]
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])  # None centres: 0.5 at rho 2


def _stock_sigma(steps: int, skip: int, shift: float) -> float:
    """Step ``skip``'s sigma of FluxPipeline's N-step schedule on a stock diffusers scheduler with a static shift."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    stock = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    stock.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    return pytest.approx(float(stock.sigmas[skip]), abs=1e-6)


def test_testbed_warm_start_starts_from_the_renoised_guide_and_says_so(monkeypatch):
    """Warm start: the integration starts from the guide upsampled, sharpened and re-noised (computed here
    independently) at step k's sigma and runs N - k steps; the sample says where it started. Cold: from the noise."""
    import math

    import torch.nn.functional as F

    from ultragen.testbed import sample as sample_module

    starts = []
    euler = sample_module.euler

    def recording(velocity, x, sigmas, *args):
        starts.append((x.clone(), sigmas.clone()))
        return euler(velocity, x, sigmas, *args)

    monkeypatch.setattr(sample_module, "euler", recording)
    model = MICRO.build_model().eval()
    enc = MICRO.text_encoder()
    prompt, empty = enc.encode_scenes([sample_scene(0)]), enc.encode_scenes([None])
    c, n = MICRO.codec().channels, MICRO.base_tokens
    g = torch.Generator().manual_seed(0)
    guide, other_guide = torch.randn(1, c, n, n, generator=g), torch.randn(1, c, n, n, generator=g)
    noise = torch.randn(1, c, 2 * n, 2 * n, generator=g)
    settings = SamplerSettings(steps=4, warm_start_skip=2, sharpen_strength=0.6, sharpen_sigma_tokens=1.2,
                               backend="reference")

    def run(warm, g_):
        return sample_hires(model, MICRO, Strategy.WINDOWS, warm, g_, prompt, empty, noise, settings, scale=2)

    warm, cold = run(True, guide), run(False, guide)
    sigma = _stock_sigma(steps=4, skip=2, shift=settings.hires_shift)
    assert (warm.start_sigma, warm.steps_run) == (sigma, 2) and (cold.start_sigma, cold.steps_run) == (1.0, 4)
    (x_warm, sigmas_warm), (x_cold, _) = starts
    assert float(sigmas_warm[0]) == sigma and len(sigmas_warm) == 3
    torch.testing.assert_close(x_cold, noise, rtol=0, atol=0)
    # the reference: bicubic x2 -> x + s (x - blur(x)) with a 2D Gaussian (radius ceil(3 sigma), reflect) -> renoise
    up = F.interpolate(guide.double(), size=(2 * n, 2 * n), mode="bicubic", align_corners=False)
    r = math.ceil(3 * 1.2)
    d = torch.arange(-r, r + 1, dtype=torch.float64)
    kernel = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * 1.2**2))
    blurred = F.conv2d(F.pad(up, (r,) * 4, mode="reflect"), (kernel / kernel.sum()).expand(c, 1, -1, -1), groups=c)
    s = warm.start_sigma
    expected = (1 - s) * (up + 0.6 * (up - blurred)) + s * noise.double()
    torch.testing.assert_close(x_warm, expected.float(), rtol=1e-5, atol=1e-5)
    # windows only (no guide stream): the guide reaches the output only through the warm start
    assert not torch.allclose(run(True, other_guide).latents, warm.latents)
    torch.testing.assert_close(run(False, other_guide).latents, cold.latents, rtol=0, atol=0)
