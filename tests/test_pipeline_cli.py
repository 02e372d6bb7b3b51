"""``ultragen generate`` / ``ultragen decode`` end to end with tiny-random on CPU, and every bad input.

Runs in-process through ``ultragen.cli.main`` with few steps (2 guide steps, hires schedule of 3 with 1 skipped)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ultragen.pipeline.two_stage  # noqa: F401  (import diffusers' pipelines now: their import-time notices)
from ultragen.cli import main
from ultragen.flux import HierFluxTransformer
from ultragen.pipeline import GenerationConfig, UltraGenPipeline

FAST = ["--model", "tiny-random", "--guide-steps", "2", "--steps", "3", "--warm-start-skip", "1", "--quiet",
        "--device", "cpu"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))


def generate(*args: str) -> int:
    return main(["generate", *FAST, *args])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("width, height", [(512, 512), (512, 768)])
def test_generate_writes_exact_size_png_with_metadata_and_sidecar(tmp_path, width, height):
    out = tmp_path / "fox.png"
    assert generate("--prompt", "a red fox", "--width", str(width), "--height", str(height), "--seed", "5",
                    "--out", str(out)) == 0
    image = Image.open(out)
    assert image.size == (width, height)
    assert image.text["prompt"] == "a red fox" and image.text["seed"] == "5" and image.text["model"] == "tiny-random"
    settings = json.loads(image.text["ultragen_config"])
    assert (settings["width_px"], settings["height_px"], settings["warm_start_skip"]) == (width, height, 1)
    record = json.loads((tmp_path / "fox.json").read_text())
    assert record["config"] == settings and record["prompt"] == "a red fox"
    assert record["image_size_px"] == [width, height] and set(record["timings_s"]) >= {"guide", "hires", "decode"}
    assert record["warm_start_sigma"] == pytest.approx(6 / 7)  # N=3, k=1, shift 3: s = 2/3 -> 2 / (7/3)
    assert (tmp_path / "fox.latent.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf-home") == [
        "fox.json", "fox.latent.safetensors", "fox.png"]


def test_same_seed_same_image_other_seed_other_image(tmp_path):
    for name, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        assert generate("--prompt", "a red fox", "--width", "512", "--height", "512", "--seed", seed,
                        "--out", str(tmp_path / f"{name}.png")) == 0
    a, b, c = (pixels(tmp_path / f"{n}.png") for n in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_prompts_file_writes_one_image_per_prompt_with_counting_seeds(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red fox\n\na blue bird\n")
    assert generate("--prompts-file", str(prompts), "--width", "512", "--height", "512", "--seed", "3",
                    "--out", str(tmp_path / "out")) == 0
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["000-a-red-fox-s3.png", "001-a-blue-bird-s4.png"]
    assert Image.open(tmp_path / "out" / names[1]).text["prompt"] == "a blue bird"


def test_cascade_feeds_each_output_to_the_next_pass(tmp_path):
    out = tmp_path / "c.png"
    assert generate("--prompt", "a red fox", "--width", "512", "--height", "512", "--rho", "2", "--cascade",
                    "--out", str(out)) == 0
    assert Image.open(out).size == (512, 512)
    record = json.loads((tmp_path / "c.json").read_text())
    assert record["config"]["cascade_levels"] == 2
    assert record["guide_size_px"] == [128, 128]  # 512² -> its guide 256² (rho 2) -> that one's guide 128²
    assert {"hires0", "hires1"} <= set(record["timings_s"])


def test_decode_from_latent_reproduces_the_image(tmp_path):
    assert generate("--prompt", "a red fox", "--width", "512", "--height", "768", "--out",
                    str(tmp_path / "fox.png")) == 0
    latent = tmp_path / "fox.latent.safetensors"
    assert main(["decode", str(latent), "--out", str(tmp_path / "again.png"), "--device", "cpu", "--quiet"]) == 0
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "fox.png"))
    assert Image.open(tmp_path / "again.png").text["prompt"] == "a red fox"
    assert main(["decode", str(latent), "--out", str(tmp_path / "small.png"), "--tile-size", "256",
                 "--device", "cpu", "--quiet"]) == 0
    small = pixels(tmp_path / "small.png").astype(float)
    assert small.shape == (768, 512, 3)
    assert np.abs(small - pixels(tmp_path / "fox.png")).mean() < 8  # other tiles, same picture


def test_python_api_runs_steps_k_to_n_and_is_deterministic(monkeypatch):
    calls = []
    forward = HierFluxTransformer.forward

    def counting(self, hires, *args, **kwargs):
        calls.append(hires.shape)
        return forward(self, hires, *args, **kwargs)

    monkeypatch.setattr(HierFluxTransformer, "forward", counting)
    pipe = UltraGenPipeline.from_pretrained("tiny-random", dtype=torch.float32)
    kwargs = dict(num_inference_steps=4, warm_start_skip=1, guide_steps=2, output_type="pt", progress=False)
    first = pipe("a red fox", 768, 512, generator=torch.Generator().manual_seed(9), **kwargs)
    assert len(calls) == 3  # steps 1..3 of a 4-step schedule
    assert first.images.shape == (1, 3, 768, 512) and first.latents.shape == (1, 4, 96, 64)
    assert first.guide_latents.shape == (1, 4, 24, 16)  # 768x512 (whole windows: no padding) / rho 4, latent /8
    assert first.config.seed == 9 and first.config.steps == 4 and first.config.shift == 3.0
    second = pipe("a red fox", config=first.config, output_type="latent", progress=False, offload_text_encoders=True)
    torch.testing.assert_close(second.latents, first.latents, rtol=0, atol=0)


def test_ff_chunk_tokens_reaches_the_hierarchical_pass_and_keeps_the_latents(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    chunks = []
    forward = HierFluxTransformer.forward

    def recording(self, *args, **kwargs):
        chunks.append(self.ff_chunk_tokens)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(HierFluxTransformer, "forward", recording)
    for name, extra in [("plain", ["--ff-chunk-tokens", "0"]), ("default", []),
                        ("chunked", ["--ff-chunk-tokens", "100"])]:  # 1024 hires tokens: 11 chunks
        assert generate("--prompt", "a red fox", "--width", "512", "--height", "512", "--out",
                        str(tmp_path / f"{name}.png"), *extra) == 0
    assert chunks == [None, None, 16384, 16384, 100, 100]  # hires steps 1 and 2 of 3; 0 turns it off
    assert json.loads((tmp_path / "chunked.json").read_text())["config"]["ff_chunk_tokens"] == 100
    plain, chunked = (load_file(tmp_path / f"{n}.latent.safetensors") for n in ("plain", "chunked"))
    assert plain.keys() == chunked.keys()
    for key in plain:
        torch.testing.assert_close(chunked[key], plain[key], rtol=1e-5, atol=1e-5)


# --- bad input: exit 2, one line on stderr, nothing written ----------------------------------------------------------
def _lora_file(tmp_path, rho: int, trained: bool = False):
    from ultragen.flux.lora import LoraMetadata, add_guide_lora, save_guide_lora
    from ultragen.pipeline.tiny import tiny_flux_pipeline
    from ultragen.policy import get_policy

    transformer = tiny_flux_pipeline().transformer
    add_guide_lora(transformer, rank=2, alpha=2.0)
    if trained:  # a fresh LoRA is the identity (B = 0); make it do something
        g = torch.Generator().manual_seed(0)
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=g)
    meta = LoraMetadata(base_model="tiny-random", policy=get_policy("default").to_dict(), rho=rho,
                        guide_offset_tokens=(rho - 1) / 2, ntk_factor=1.0, window_tokens=16, rank=2, alpha=2.0)
    return save_guide_lora(transformer, tmp_path / "inputs" / f"guide-rho{rho}.safetensors", meta)


def test_guide_lora_changes_the_hires_pass_but_not_the_guide(tmp_path, caplog):
    path = _lora_file(tmp_path, rho=4, trained=True)
    plain = UltraGenPipeline.from_pretrained("tiny-random", dtype=torch.float32)
    adapted = UltraGenPipeline.from_pretrained("tiny-random", dtype=torch.float32)
    kwargs = dict(num_inference_steps=3, warm_start_skip=1, guide_steps=2, output_type="latent", progress=False)
    adapted.load_lora(str(path), adapted.make_config(height=512, width=512, **{"warm_start_skip": 1}))
    with caplog.at_level("WARNING", logger="ultragen.pipeline.two_stage"):
        a = plain("a red fox", 512, 512, **kwargs)
        assert "no guide LoRA loaded" in caplog.text  # the testbed: an untrained guide is ignored
        caplog.clear()
        b = adapted("a red fox", 512, 512, **kwargs)
        assert "no guide LoRA loaded" not in caplog.text
    torch.testing.assert_close(b.guide_latents, a.guide_latents, rtol=0, atol=0)  # stage A: stock model
    assert (b.latents - a.latents).abs().mean() > 1e-3


BAD = {
    "size not a multiple of 16": (["--width", "500"], "multiple of 16"),
    "absurd size": (["--width", "40000"], "above the limit"),
    "empty prompt": (["--prompt", "  "], "--prompt is empty"),
    "empty prompts file": (["--prompts-file", "{inputs}/empty.txt"], "has no prompts"),
    "missing prompts file": (["--prompts-file", "{inputs}/nope.txt"], "does not exist"),
    "unknown backend": (["--backend", "warp-drive"], "unknown attention backend"),
    "unknown policy": (["--policy", "everything"], "unknown attention policy"),
    "missing LoRA": (["--lora", "{inputs}/nope.safetensors"], "does not exist"),
    "mismatched LoRA": (["--lora", "LORA_RHO2", "--rho", "4"], "trained under other settings"),
    "triton on the CPU": (["--backend", "triton"], "needs a CUDA device"),
    "size above the limit with a cascade": (["--width", "100000", "--cascade", "3"], "use at most 32768"),
    "unwritable output": (["--out", "{inputs}/empty.txt/fox.png"], "is a file, not a folder"),
    "not a png": (["--out", "{out}/fox.jpg"], "only PNG"),
    "skip past the schedule": (["--warm-start-skip", "5"], "warm_start_skip=5 must be below steps=3"),
    "real model offline": (["--model", "black-forest-labs/FLUX.1-dev"], "hf download"),
    "guidance on a bad value": (["--guidance", "-1"], "guidance_scale=-1.0"),
    "fp8 on the CPU": (["--fp8"], "needs a CUDA GPU"),
    "feed-forward chunk of -1 tokens": (["--ff-chunk-tokens", "-1"], "ff_chunk_tokens=-1 must be a whole number >= 1"),
}


def _merge(base: dict, extra: list[str]) -> list[str]:
    """``base`` flags with ``extra`` flags (and their values) replacing them; --prompts-file replaces --prompt."""
    args, i = dict(base), 0
    while i < len(extra):
        flag, value = extra[i], extra[i + 1] if i + 1 < len(extra) and not extra[i + 1].startswith("--") else None
        if flag == "--prompts-file":
            args.pop("--prompt")
        args[flag] = value
        i += 1 if value is None else 2
    return [item for flag, value in args.items() for item in (flag, value) if item is not None]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    (inputs / "empty.txt").write_text("# nothing here\n\n")
    extra, words = BAD[case]
    extra = [a.format(inputs=inputs, out=out) for a in extra]
    if "LORA_RHO2" in extra:
        extra[extra.index("LORA_RHO2")] = str(_lora_file(tmp_path, rho=2))
    args = _merge({"--prompt": "a red fox", "--width": "512", "--height": "512", "--out": str(out / "fox.png")}, extra)
    before = sorted(inputs.iterdir())
    capsys.readouterr()
    code = generate(*args)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert words in err, err
    assert list(out.iterdir()) == []
    assert sorted(inputs.iterdir()) == before


def test_mismatched_lora_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from ultragen.pipeline import two_stage

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(two_stage.UltraGenPipeline, "from_pretrained", no_loading)
    lora = _lora_file(tmp_path, rho=2)
    assert generate("--prompt", "a fox", "--width", "512", "--height", "512", "--lora", str(lora), "--rho", "4",
                    "--out", str(tmp_path / "fox.png")) == 2
    assert "rho: LoRA 2, run 4" in capsys.readouterr().err


def _no_loading(monkeypatch):
    from ultragen.pipeline import two_stage

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(two_stage.UltraGenPipeline, "from_pretrained", no_loading)


def test_dry_run_prints_the_resolved_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from ultragen.pipeline.tiny import tiny_flux_pipeline

    model = tmp_path / "model"
    tiny_flux_pipeline().save_pretrained(model)  # a diffusers folder like a FLUX.1-dev snapshot
    _no_loading(monkeypatch)
    assert main(["generate", "--model", str(model), "--prompt", "a fox", "--width", "3840", "--height", "2160",
                 "--out", str(tmp_path / "out" / "fox.png"), "--device", "cpu", "--dry-run",
                 "--guide-offset-tokens", "0"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # the model's defaults, filled in from its config files (guidance embedding: FLUX.1-dev's; T5 of 128 tokens)
    assert {k: plan["config"][k] for k in ("steps", "guide_steps", "warm_start_skip", "guidance_scale",
                                           "guide_guidance_scale", "text_tokens", "shift")} == {
        "steps": 28, "guide_steps": 28, "warm_start_skip": 10, "guidance_scale": 4.5, "guide_guidance_scale": 3.5,
        "text_tokens": 128, "shift": 3.0}
    assert plan["config"]["guide_offset_tokens"] == 0
    assert plan["canvas_px"] == [[3840, 2304]] and plan["guide_size_px"] == [960, 576]
    assert plan["prompts"][0]["files"][0] == str(tmp_path / "out" / "fox.png")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["model not on the machine", "folder without weights", "mismatched LoRA"])
def test_dry_run_fails_where_the_real_run_would(tmp_path, capsys, monkeypatch, case):
    args = ["--prompt", "a fox", "--width", "512", "--height", "512", "--out", str(tmp_path / "fox.png")]
    if case == "model not on the machine":
        args += ["--model", "black-forest-labs/FLUX.1-dev"]
        words = "hf download"
    elif case == "folder without weights":
        from ultragen.pipeline.tiny import tiny_flux_pipeline

        tiny_flux_pipeline().save_pretrained(tmp_path / "model")
        for weights in (tmp_path / "model" / "transformer").glob("*.safetensors"):
            weights.unlink()
        args += ["--model", str(tmp_path / "model")]
        words = "no transformer weights"
    else:
        args += ["--lora", str(_lora_file(tmp_path, rho=2)), "--rho", "4"]
        words = "rho: LoRA 2, run 4"
    _no_loading(monkeypatch)
    for dry in ([], ["--dry-run"]):  # the dry run refuses exactly what the real run refuses
        capsys.readouterr()
        assert generate(*args, *dry) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_existing_output_is_kept_without_force(tmp_path, capsys):
    out = tmp_path / "fox.png"
    out.write_bytes(b"precious")
    code = generate("--prompt", "a red fox", "--width", "512", "--height", "512", "--out", str(out))
    assert code == 2 and "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf-home") == ["fox.png"]


def test_decode_bad_input(tmp_path, capsys):
    assert main(["decode", str(tmp_path / "nope.latent.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.latent.safetensors").write_bytes(b"not a safetensors file")
    assert main(["decode", str(tmp_path / "junk.latent.safetensors")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert list(p.suffix for p in tmp_path.iterdir() if p.name != "hf-home") == [".safetensors"]


def test_generation_config_is_importable_without_diffusers_pipelines():
    assert GenerationConfig(512, 512).rho == 4


def test_installed_command_runs_offline_in_a_fresh_process(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    done = subprocess.run(
        [sys.executable, "-m", "ultragen", "generate", *FAST, "--prompt", "a red fox", "--width", "512",
         "--height", "768", "--out", "fox.png"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(tmp_path / "fox.png").size == (512, 768)
    # a clean run prints results only (no progress with --quiet): no library notices the user cannot act on; the
    # one warning left is ultragen's own, that no guide LoRA is loaded
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if not line.startswith(("wrote ", "no guide LoRA loaded"))] == [], done.stderr
    assert len(lines) == 2
    again = subprocess.run([sys.executable, "-m", "ultragen", "decode", "fox.latent.safetensors", "--out", "again.png",
                            "--device", "cpu", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and again.stderr.strip() == "wrote " + str(Path("again.png")), again.stderr


def test_no_guide_cache_reaches_the_hierarchical_pass_and_keeps_the_latents(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    seen = []
    guide_pass = HierFluxTransformer._guide_pass

    def recording(self, *args, **kwargs):
        seen.append(self.cache_guide)
        return guide_pass(self, *args, **kwargs)

    monkeypatch.setattr(HierFluxTransformer, "_guide_pass", recording)
    for name, extra in [("cached", []), ("uncached", ["--no-guide-cache"])]:
        assert generate("--prompt", "a red fox", "--width", "512", "--height", "512", "--out",
                        str(tmp_path / f"{name}.png"), *extra) == 0
    # the cached run's one guide pass; uncached, the guide runs inside every step instead. (Before generate_latents
    # ran under no_grad, `ultragen generate` built an autograd graph and never used the cache: seen was [].)
    assert seen == [True]
    assert json.loads((tmp_path / "uncached.json").read_text())["config"]["cache_guide"] is False
    cached, uncached = (load_file(tmp_path / f"{n}.latent.safetensors") for n in ("cached", "uncached"))
    for key in cached:
        torch.testing.assert_close(uncached[key], cached[key], rtol=1e-5, atol=1e-5)


def test_generate_latents_builds_no_autograd_graph_even_with_grad_enabled():
    pipe = UltraGenPipeline.from_pretrained("tiny-random", dtype=torch.float32)
    assert any(p.requires_grad for p in pipe.flux.transformer.parameters())
    config = pipe.make_config(None, 256, 256, 3, guide_steps=2, warm_start_skip=1)
    with torch.enable_grad():
        latents, guide, _ = pipe.generate_latents("a red fox", config, progress=False)
        images = pipe.decode(latents, progress=False)
    assert not latents.requires_grad and not guide.requires_grad and not images.requires_grad


def test_one_pipeline_switches_the_guide_cache_between_calls():
    pipe = UltraGenPipeline.from_pretrained("tiny-random", dtype=torch.float32)
    kwargs = dict(num_inference_steps=3, warm_start_skip=1, guide_steps=2, output_type="latent", progress=False)
    for cache in (True, False, True):
        pipe("a red fox", 256, 256, cache_guide=cache, **kwargs)
        assert pipe._hier[1].cache_guide is cache
