"""``ultragen generate`` with FLUX.2 [klein] (tiny-random-klein[-base], CPU) end to end, family detection, LoRA
family checks, and FLUX.1's bad-input cases run against both tiny models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ultragen.pipeline.two_stage  # noqa: F401  (import diffusers' pipelines now: their import-time notices)
from ultragen.cli import main
from ultragen.flux2 import HierFlux2Transformer

from test_pipeline_cli import BAD, _lora_file, _merge  # FLUX.1's cases, reused

FAST = ["--guide-steps", "2", "--steps", "2", "--quiet", "--device", "cpu"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))


def generate(model: str, *args: str) -> int:
    skip = ["--warm-start-skip", "1"] if model == "tiny-random" and "--warm-start-skip" not in args else []
    return main(["generate", "--model", model, *FAST, *skip, *args])


@pytest.mark.parametrize("width, height", [(512, 768), (400, 656)])
def test_klein_generate_writes_exact_size_png(tmp_path, width, height, monkeypatch):
    calls = []
    forward = HierFlux2Transformer.forward

    def counting(self, hires, *args, **kwargs):
        calls.append(hires.shape)
        return forward(self, hires, *args, **kwargs)

    monkeypatch.setattr(HierFlux2Transformer, "forward", counting)
    out = tmp_path / "fox.png"
    assert generate("tiny-random-klein", "--prompt", "a red fox", "--width", str(width), "--height", str(height),
                    "--out", str(out)) == 0
    assert Image.open(out).size == (width, height)
    record = json.loads((tmp_path / "fox.json").read_text())
    assert record["model_family"] == "flux2-klein"
    # the klein default: no warm start, the hires stage starts from pure noise (sigma 1) and runs all its steps
    assert record["config"]["warm_start_skip"] == 0 and record["warm_start_sigma"] == 1.0
    assert len(calls) == 2  # 2 hires steps, one transformer call each (no CFG)
    assert record["config"]["true_cfg_scale"] is None


def test_klein_base_runs_cfg_with_two_branches_sharing_the_guide_cache(tmp_path, monkeypatch):
    calls, guide_passes = [], []
    forward, guide_pass = HierFlux2Transformer.forward, HierFlux2Transformer._guide_pass

    def counting(self, hires, text, *args, **kwargs):
        calls.append(text.clone())
        return forward(self, hires, text, *args, **kwargs)

    def counting_pass(self, *args, **kwargs):
        guide_passes.append(1)
        return guide_pass(self, *args, **kwargs)

    monkeypatch.setattr(HierFlux2Transformer, "forward", counting)
    monkeypatch.setattr(HierFlux2Transformer, "_guide_pass", counting_pass)
    out = tmp_path / "fox.png"
    assert generate("tiny-random-klein-base", "--prompt", "a red fox", "--negative-prompt", "blurry", "--cfg", "3",
                    "--width", "512", "--height", "512", "--out", str(out)) == 0
    assert Image.open(out).size == (512, 512)
    record = json.loads((tmp_path / "fox.json").read_text())
    assert record["model_family"] == "flux2-klein-base"
    assert record["config"]["true_cfg_scale"] == 3.0 and record["config"]["guide_true_cfg_scale"] == 4.0
    assert len(calls) == 4  # 2 steps x (prompt, negative prompt)
    assert not torch.equal(calls[0], calls[1])  # the two branches see different texts
    assert guide_passes == [1]  # one guide pass for the image: both branches and both steps reuse it


def test_cfg_is_refused_on_a_distilled_klein_and_on_flux1(tmp_path, capsys):
    for model in ("tiny-random-klein", "tiny-random"):
        assert generate(model, "--prompt", "a fox", "--cfg", "3", "--width", "512", "--height", "512",
                        "--out", str(tmp_path / "fox.png")) == 2
        err = capsys.readouterr().err
        assert "without classifier-free guidance" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "fox.png").exists()


def test_klein_cfg_equals_the_hand_written_combination():
    """The base model's velocity is neg + s * (pos - neg) of two plain hierarchical calls (independent check)."""
    from ultragen.family import Prompt, family_named
    from ultragen.flux2.tiny import tiny_klein_transformer
    from ultragen.layout import make_layout
    from ultragen.pipeline import GenerationConfig
    from ultragen.policy import build_plan

    family = family_named("flux2")
    layout = make_layout(256, 256, window_tokens=8, block_tokens=64, text_tokens=128)
    plan = build_plan(layout)
    hier = HierFlux2Transformer(tiny_klein_transformer(), backend="reference")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, layout.hires_tokens, 16, generator=g)
    guide = torch.randn(1, layout.guide_tokens, 16, generator=g)
    pos, neg = torch.randn(2, 1, 128, 48, generator=g)
    sigma = torch.tensor([0.6])
    config = GenerationConfig(256, 256, window_tokens=8, block_tokens=64, true_cfg_scale=2.5)
    with torch.no_grad():
        got = family.velocity(hier, x, Prompt(pos, None, neg), sigma, plan, guide, config)
        p, n = hier(x, pos, sigma, plan, guide=guide), hier(x, neg, sigma, plan, guide=guide)
    torch.testing.assert_close(got, n + 2.5 * (p - n), rtol=1e-5, atol=1e-6)


def test_family_detected_from_a_saved_folder_and_decode_rebuilds_the_klein_vae(tmp_path, capsys):
    from ultragen.flux2.tiny import tiny_klein_pipeline

    model = tmp_path / "klein"
    tiny_klein_pipeline(is_distilled=False).save_pretrained(model)
    assert main(["generate", "--model", str(model), "--prompt", "a fox", "--width", "512", "--height", "512",
                 "--out", str(tmp_path / "fox.png"), "--device", "cpu", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["config"]["steps"], plan["config"]["guide_steps"], plan["config"]["true_cfg_scale"],
            plan["config"]["warm_start_skip"]) == (28, 50, 4.0, 0)
    assert generate("tiny-random-klein", "--prompt", "a red fox", "--width", "512", "--height", "512",
                    "--out", str(tmp_path / "k.png")) == 0
    assert main(["decode", str(tmp_path / "k.latent.safetensors"), "--out", str(tmp_path / "again.png"),
                 "--device", "cpu", "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "k.png")))


def _klein_lora(tmp_path):
    from ultragen.flux.lora import LoraMetadata
    from ultragen.flux2.lora import add_guide_lora, save_guide_lora
    from ultragen.flux2.tiny import tiny_klein_transformer
    from ultragen.policy import get_policy

    transformer = tiny_klein_transformer()
    add_guide_lora(transformer, rank=2, alpha=2.0)
    meta = LoraMetadata(base_model="tiny-random-klein", policy=get_policy("default").to_dict(), rho=4,
                        guide_offset_tokens=1.5, ntk_factor=1.0, window_tokens=16, rank=2, alpha=2.0, targets="wide")
    return save_guide_lora(transformer, tmp_path / "inputs" / "klein.safetensors", meta)


@pytest.mark.parametrize("model, lora", [("tiny-random-klein", "flux1"), ("tiny-random", "flux2")])
def test_a_lora_of_the_other_family_is_refused_in_one_line(tmp_path, capsys, model, lora):
    path = _lora_file(tmp_path, rho=4) if lora == "flux1" else _klein_lora(tmp_path)
    for flag in ("--lora", "--style-lora"):
        assert generate(model, "--prompt", "a fox", "--width", "512", "--height", "512", flag, str(path),
                        "--out", str(tmp_path / "fox.png")) == 2
        err = capsys.readouterr().err
        assert "LoRA but model" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "fox.png").exists()


def test_our_klein_lora_loads_and_runs(tmp_path):
    path = _klein_lora(tmp_path)
    assert generate("tiny-random-klein", "--prompt", "a fox", "--width", "512", "--height", "512", "--lora",
                    str(path), "--out", str(tmp_path / "fox.png")) == 0
    assert json.loads((tmp_path / "fox.json").read_text())["lora"]["base_model"] == "tiny-random-klein"


KLEIN_SKIPS = {"skip past the schedule": ["--warm-start-skip", "5"],  # steps=2 here: skip 5 is past it too
               "real model offline": ["--model", "black-forest-labs/FLUX.2-klein-4B"]}


@pytest.mark.parametrize("case", [c for c in BAD if c != "mismatched LoRA"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing_for_klein(tmp_path, capsys, case):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    (inputs / "empty.txt").write_text("# nothing here\n\n")
    extra, words = BAD[case]
    extra = KLEIN_SKIPS.get(case, extra)
    if case == "skip past the schedule":
        words = "warm_start_skip=5 must be below steps=2"
    extra = [a.format(inputs=inputs, out=out) for a in extra]
    args = _merge({"--prompt": "a red fox", "--width": "512", "--height": "512", "--out": str(out / "fox.png")}, extra)
    model = "tiny-random-klein"
    if "--model" in args:
        model = args.pop(args.index("--model") + 1)
        args.remove("--model")
    before = sorted(inputs.iterdir())
    capsys.readouterr()
    code = generate(model, *args)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert words in err, err
    assert list(out.iterdir()) == []
    assert sorted(inputs.iterdir()) == before


def test_guidance_embedding_is_refused_on_klein(tmp_path, capsys):
    assert generate("tiny-random-klein", "--prompt", "a fox", "--guidance", "3", "--width", "512", "--height", "512",
                    "--out", str(tmp_path / "fox.png")) == 2
    assert "no guidance embedding" in capsys.readouterr().err


def test_the_authors_klein_lora_file_runs_through_generate_with_their_settings(tmp_path, capsys):
    """A file saved exactly the authors' way from the tiny-random-klein transformer loads with --lora: its settings
    (their policy, rho 4, guide offset 0) become the run's and are stated, and it runs end to end."""
    from ultragen.flux2.tiny import tiny_klein_transformer

    from test_flux2_lora import save_the_authors_way

    path = save_the_authors_way(tiny_klein_transformer(), tmp_path)
    out = tmp_path / "fox.png"
    assert generate("tiny-random-klein", "--prompt", "a fox", "--width", "512", "--height", "512", "--lora",
                    str(path), "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "settings from the LoRA" in err and "policy=authors-code" in err and "guide_offset_tokens=0.0" in err
    record = json.loads((tmp_path / "fox.json").read_text())
    assert record["config"]["policy"] == "authors-code" and record["config"]["guide_offset_tokens"] == 0.0
    assert record["lora"]["extra"] == {"source": "authors"}
