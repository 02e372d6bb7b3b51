"""``ultragen eval`` end to end on folders of synthetic images with small random feature networks (a conv net in
place of InceptionV3, a tiny CLIP folder), and every bad input: exit 2, one line on stderr, no report folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ultragen.cli import main
from ultragen.eval import inception
from ultragen.eval.tiny import TinyFeatureNet, write_tiny_clip
from ultragen.pipeline.outputs import write_png

FEATURES = 8  # the stand-in's feature width: FID needs at least 9 images (or patches) per set


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture
def net(monkeypatch):
    """Replace the InceptionV3 loader by a small random conv net; refuse any download."""
    calls = []

    def load(weights, feature_dim, device):
        calls.append(weights)
        return TinyFeatureNet(feature_dim=FEATURES)

    monkeypatch.setattr(inception, "load_inception", load)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("a download was attempted"))
    return calls


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    path.write_bytes(b"stand-in: the loader is replaced")
    return path


def make_folder(folder, n, size=(96, 80), brightness=0, prompts=True, fmt="png", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = size
        base = rng.integers(0, 200, size=(h // 8, w // 8, 3)).astype(np.uint8)
        pixels = np.kron(base, np.ones((8, 8, 1), np.uint8)) + rng.integers(0, 40, size=(h, w, 3)).astype(np.uint8)
        image = Image.fromarray(np.clip(pixels.astype(int) + brightness, 0, 255).astype(np.uint8))
        if fmt == "png":  # written as ultragen generate writes its PNGs
            write_png(folder / f"{i:03d}-img.png", image, {"prompt": f"prompt number {i}"} if prompts else {})
        else:
            image.save(folder / f"{i:03d}-img.jpg", quality=95)
    return folder


def run(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fid_scipy(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real))


def features_of(folder):
    images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
              for p in sorted(folder.iterdir())]
    return TinyFeatureNet(feature_dim=FEATURES)(torch.stack(images))[0].double().numpy()


def test_end_to_end_report(tmp_path, capsys, net, weights, tiny_clip):
    gen = make_folder(tmp_path / "gen", 12, seed=1)
    ref = make_folder(tmp_path / "ref", 14, size=(112, 96), brightness=40, fmt="jpg", seed=2)
    out = tmp_path / "report"
    code, stdout, stderr = run(capsys, "--images", gen, "--reference", ref, "--out", out, "--patch-size", 32,
                               "--patches-per-image", 3, "--inception-weights", weights, "--clip-model", tiny_clip,
                               "--device", "cpu", "--seed", 3)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["crops.png", "metrics.json", "plot.svg", "report.html"]
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    assert list(m) == ["fid", "is", "clip", "clipiqa", "fid_patch", "is_patch"]
    assert (m["fid"]["generated_samples"], m["fid"]["reference_samples"], m["fid"]["feature_dim"]) == (12, 14, 8)
    assert m["fid"]["value"] == pytest.approx(fid_scipy(features_of(gen), features_of(ref)), rel=1e-3)
    assert m["is"]["samples"] == 12 and m["is"]["splits"] == 10
    assert (m["fid_patch"]["generated_samples"], m["fid_patch"]["reference_samples"]) == (36, 42)
    assert m["fid_patch"]["patch_px"] == 32 and m["fid_patch"]["seed"] == 3 and m["is_patch"]["samples"] == 36
    assert m["clip"]["samples"] == 12 and m["clipiqa"]["prompts"] == ["Good photo.", "Bad photo."]
    assert [row["file"] for row in record["per_image"]] == [f"{i:03d}-img.png" for i in range(12)]
    assert m["clip"]["value"] == pytest.approx(np.mean([row["clip"] for row in record["per_image"]]), rel=1e-5)
    assert all(np.isfinite(e["value"]) for e in m.values())
    assert record["sets"]["reference"]["sizes"] == {"112x96": 14}
    assert record["settings"]["seed"] == 3 and record["networks"]["inception"]["feature_dim"] == 8
    html = (out / "report.html").read_text()
    assert "fid_patch" in html and "<svg" in html and "crops.png" in html
    assert Image.open(out / "crops.png").size[0] > 0
    assert json.loads(stdout)["fid"] == pytest.approx(m["fid"]["value"], abs=1e-4)
    assert len(stderr.strip().splitlines()) == 1  # quiet: only the "wrote ..." line
    assert net  # the stand-in was used, through the production loader's place

    # the same folder as its own reference: FID 0; a rerun gives the same figures (seeded crops and splits)
    again = tmp_path / "again"
    code, _, _ = run(capsys, "--images", gen, "--reference", gen, "--out", again, "--patch-size", 32,
                     "--patches-per-image", 3, "--inception-weights", weights, "--metrics", "fid,fid_patch,is_patch",
                     "--seed", 3, "--device", "cpu")
    assert code == 0
    m2 = json.loads((again / "metrics.json").read_text())["metrics"]
    assert m2["fid"]["value"] == pytest.approx(0, abs=1e-3) and m2["fid_patch"]["value"] == pytest.approx(0, abs=1e-3)
    assert m2["is_patch"]["value"] == pytest.approx(m["is_patch"]["value"], rel=1e-6)


def test_prompts_file_is_used_for_images_without_metadata(tmp_path, capsys, net, tiny_clip):
    gen = make_folder(tmp_path / "gen", 3, fmt="jpg")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# generate's rule: comments and blank lines are skipped\na\n\nb\nc\n")
    out = tmp_path / "r"
    code, _, stderr = run(capsys, "--images", gen, "--prompts", prompts, "--out", out, "--metrics", "clip",
                          "--clip-model", tiny_clip, "--device", "cpu")
    assert code == 0, stderr
    assert json.loads((out / "metrics.json").read_text())["metrics"]["clip"]["samples"] == 3


def assert_refused(tmp_path, code, stderr, out, *fragments):
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary folder left


def test_missing_weights_fail_at_once_without_trying(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(inception, "load_inception", lambda *a: pytest.fail("Inception loaded without weights"))
    import transformers

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("CLIP loaded without a model folder")))
    gen = make_folder(tmp_path / "gen", 2)
    out = tmp_path / "r"
    code, _, err = run(capsys, "--images", gen, "--out", out, "--metrics", "is")
    assert_refused(tmp_path, code, err, out, "weights-inception-2015-12-05-6726825d.pth", "--inception-weights")
    code, _, err = run(capsys, "--images", gen, "--out", out, "--metrics", "is", "--inception-weights",
                       tmp_path / "nope.pth")
    assert_refused(tmp_path, code, err, out, "nope.pth", "is not a file", "--inception-weights")
    code, _, err = run(capsys, "--images", gen, "--out", out, "--metrics", "clip")
    assert_refused(tmp_path, code, err, out, "hf download openai/clip-vit-large-patch14", "--clip-model")
    code, _, err = run(capsys, "--images", gen, "--out", out, "--metrics", "clipiqa", "--clip-model", tmp_path)
    assert_refused(tmp_path, code, err, out, "no config.json", "--clip-model")


@pytest.mark.parametrize("case", ["empty", "unreadable", "truncated", "mixed_sizes", "few_for_fid",
                                  "few_patches_for_fid", "few_for_is", "prompt_count", "prompt_mismatch",
                                  "no_prompts", "patch_too_big", "no_reference", "out_exists"])
def test_bad_input_exits_2_with_one_line_and_no_report(case, tmp_path, capsys, net, weights, tiny_clip):
    gen, ref, out = tmp_path / "gen", tmp_path / "ref", tmp_path / "report"
    base = ["--out", out, "--inception-weights", weights, "--clip-model", tiny_clip, "--device", "cpu",
            "--patch-size", 32]
    if case == "empty":
        gen.mkdir()
        (gen / "notes.txt").write_text("not an image")
        args, expect = ["--images", gen, "--metrics", "is"], ["holds no .png/.jpg/.jpeg file"]
    elif case == "unreadable":
        make_folder(gen, 12)
        (gen / "005-img.png").write_bytes(b"\x89PNG not really")
        args, expect = ["--images", gen, "--metrics", "is"], ["005-img.png", "not a readable image"]
    elif case == "truncated":
        make_folder(gen, 12)
        data = (gen / "007-img.png").read_bytes()
        (gen / "007-img.png").write_bytes(data[: len(data) // 2])
        args, expect = ["--images", gen, "--metrics", "is"], ["007-img.png", "could not be decoded"]
    elif case == "mixed_sizes":
        make_folder(gen, 10)
        make_folder(tmp_path / "other", 2, size=(64, 64))
        for p in (tmp_path / "other").iterdir():
            p.rename(gen / f"9{p.name}")
        args, expect = ["--images", gen, "--metrics", "is"], ["mixes sizes", "10 at 96x80", "2 at 64x64"]
    elif case == "few_for_fid":
        make_folder(gen, 12)
        make_folder(ref, 5)
        args = ["--images", gen, "--reference", ref, "--metrics", "fid"]
        expect = ["5 reference images", "rank at most 4 < 8", "at least 9"]
    elif case == "few_patches_for_fid":
        make_folder(gen, 2)
        make_folder(ref, 12)
        args = ["--images", gen, "--reference", ref, "--metrics", "fid_patch", "--patches-per-image", 4]
        expect = ["fid_patch: 8 generated patches", "at least 9", "--patches-per-image"]
    elif case == "few_for_is":
        make_folder(gen, 6)
        args, expect = ["--images", gen, "--metrics", "is"], ["6 images cannot fill 10 splits", "--is-splits 6"]
    elif case == "prompt_count":
        make_folder(gen, 3, prompts=False)
        (tmp_path / "p.txt").write_text("one\ntwo\n")
        args = ["--images", gen, "--prompts", tmp_path / "p.txt", "--metrics", "clip"]
        expect = ["has 2 prompts but --images holds 3 images"]
    elif case == "prompt_mismatch":
        make_folder(gen, 3)
        (tmp_path / "p.txt").write_text("prompt number 0\nprompt number 2\nprompt number 1\n")
        args = ["--images", gen, "--prompts", tmp_path / "p.txt", "--metrics", "clip"]
        expect = ["line 2", "does not match the prompt stored in '001-img.png'"]
    elif case == "no_prompts":
        make_folder(gen, 3, prompts=False)
        args, expect = ["--images", gen, "--metrics", "clip"], ["3 of 3 images have no prompt", "--prompts FILE"]
    elif case == "patch_too_big":
        make_folder(gen, 12)
        args = ["--images", gen, "--metrics", "is_patch", "--patch-size", 128]
        expect = ["96x80 image is smaller than --patch-size 128"]
    elif case == "no_reference":
        make_folder(gen, 12)
        args, expect = ["--images", gen, "--metrics", "fid,is"], ["--reference DIR", "--metrics is"]
    elif case == "out_exists":
        make_folder(gen, 12)
        out.mkdir()
        (out / "metrics.json").write_text("{}")
        code, _, err = run(capsys, *base, "--images", gen, "--metrics", "is")
        assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
        assert (out / "metrics.json").read_text() == "{}"  # untouched
        return
    code, _, err = run(capsys, *base, *args)
    assert_refused(tmp_path, code, err, out, *expect)
