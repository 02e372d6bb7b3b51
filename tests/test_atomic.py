import os
import stat

import pytest

from ultragen.atomic import atomic_path


def test_atomic_path_writes_whole_file_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists(), "the target must not appear before the write is complete"
    assert target.read_text() == "new"
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_folder_swaps_in_whole_and_leaves_nothing_on_error(tmp_path):
    from ultragen.atomic import atomic_folder

    target = tmp_path / "ckpt"
    with atomic_folder(target) as tmp:
        (tmp / "a.bin").write_bytes(b"1")
    assert (target / "a.bin").read_bytes() == b"1"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a.bin").write_bytes(b"half")
            raise RuntimeError("crash")
    assert (target / "a.bin").read_bytes() == b"1"
    with atomic_folder(target) as tmp:
        (tmp / "b.bin").write_bytes(b"2")
    assert sorted(p.name for p in target.iterdir()) == ["b.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# --- the modules that write files a user or a later step reads: a failure mid-write leaves no partial file ----------
def _fail_on_call(n: int, write_partial):
    """A replacement for a save/write method: calls before the n-th run the original; the n-th writes a partial file
    to where it was told to write and raises (a full disk, a kill)."""
    calls = []

    def wrap(original):
        def method(self, target, *args, **kwargs):
            calls.append(target)
            if len(calls) == n:
                write_partial(target)
                raise OSError(28, "No space left on device")
            return original(self, target, *args, **kwargs)

        return method

    return wrap


def _partial_bytes(target):
    from pathlib import Path

    Path(target).write_bytes(b"\x89PNG partial")


def _visible(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_bench_result_is_whole_or_absent(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from ultragen.bench import record

    monkeypatch.setattr(record, "environment", lambda: {"gpu": "test"})
    path = record.write_result(tmp_path / "results" / "r.json", {"rows": [1, 2]})
    assert json.loads(path.read_text()) == {"gpu": "test", "rows": [1, 2]}
    original = Path.write_text

    def failing(self, text, *args, **kwargs):  # half the text reaches the disk, then the disk is full
        original(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError, match="No space"):
        record.write_result(tmp_path / "results" / "s.json", {"rows": [3]})
    assert _visible(tmp_path / "results") == ["r.json"]


def test_testbed_scene_set_never_holds_a_partial_image_or_an_index_of_unwritten_scenes(tmp_path, monkeypatch):
    from PIL import Image

    from ultragen.testbed.data import write_scenes

    monkeypatch.setattr(Image.Image, "save", _fail_on_call(2, _partial_bytes)(Image.Image.save))
    with pytest.raises(OSError, match="No space"):
        list(write_scenes(tmp_path / "scenes", range(3), 32))
    assert _visible(tmp_path / "scenes") == ["0000000000.png", "0000000000.txt"]  # scene 0 whole, nothing else
    assert Image.open(tmp_path / "scenes" / "0000000000.png").size == (32, 32)


def test_testbed_eval_results_are_whole_or_absent(tmp_path, monkeypatch):
    import json

    import torch
    from PIL import Image

    from ultragen.testbed.evaluate import write_results

    images = {"base": torch.rand(2, 3, 8, 8), "dense": torch.rand(2, 3, 16, 16)}
    monkeypatch.setattr(Image.Image, "save", _fail_on_call(1, _partial_bytes)(Image.Image.save))
    with pytest.raises(OSError, match="No space"):
        write_results({"rows": []}, images, tmp_path / "eval.json", tmp_path / "eval.png")
    assert _visible(tmp_path) == ["eval.json"] and json.loads((tmp_path / "eval.json").read_text()) == {"rows": []}


def test_testbed_model_export_is_swapped_in_whole(tmp_path):
    from ultragen.testbed.train import export_model

    class Model:
        def __init__(self, fail):
            self.fail = fail

        def save_pretrained(self, folder):
            folder.mkdir(parents=True)
            (folder / "config.json").write_text("{}")
            (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"partial" if self.fail else b"whole")
            if self.fail:
                raise OSError(28, "No space left on device")

    export_model(Model(False), tmp_path / "model")
    with pytest.raises(OSError, match="No space"):
        export_model(Model(True), tmp_path / "model")
    assert (tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == b"whole"
    assert _visible(tmp_path) == ["model", "model/model_index.json", "model/transformer",
                                  "model/transformer/config.json",
                                  "model/transformer/diffusion_pytorch_model.safetensors"]


class _StubPipe:
    """What prepare.generate_images and samples.write_samples call on a pipeline: images of the asked size."""

    def __init__(self):
        from types import SimpleNamespace

        self.transformer = SimpleNamespace(config=SimpleNamespace(guidance_embeds=False), training=False,
                                           eval=lambda: None, train=lambda mode: None)

    def set_progress_bar_config(self, **kwargs):
        pass

    def make_config(self, **settings):
        pass

    def __call__(self, prompt, height=16, width=16, **kwargs):
        from types import SimpleNamespace

        from PIL import Image

        return SimpleNamespace(images=[Image.new("RGB", (width, height), (200, 10, 10))])


def test_generated_training_images_are_whole_or_absent(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from PIL import Image

    from ultragen.train.prepare import generate_images

    config = SimpleNamespace(generate_steps=1, generate_count=3, seed=0, size_px=16, generate_guidance=3.5)
    monkeypatch.setattr(Image.Image, "save", _fail_on_call(2, _partial_bytes)(Image.Image.save))
    with pytest.raises(OSError, match="No space"):
        generate_images(_StubPipe(), config, ["a fox"], tmp_path / "images", 128, progress=False)
    assert _visible(tmp_path / "images") == ["000000.png", "000000.txt"]
    assert Image.open(tmp_path / "images" / "000000.png").size == (16, 16)


def test_validation_samples_are_whole_or_absent(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from PIL import Image

    from ultragen.train import samples

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na cat\n")
    monkeypatch.setattr(samples, "_pipeline", lambda transformer, model: _StubPipe())
    config = SimpleNamespace(validate_prompts=str(prompts), model="stub", policy="default", ntk_factor=1.0)
    layout = SimpleNamespace(height_px=16, width_px=16, rho=4, window_tokens=16, guide_offset_tokens=1.5)
    monkeypatch.setattr(Image.Image, "save", _fail_on_call(2, _partial_bytes)(Image.Image.save))
    transformer = _StubPipe().transformer
    with pytest.raises(OSError, match="No space"):
        samples.write_samples(transformer, config, layout, tmp_path / "run", 7, log_line=lambda line: None)
    assert _visible(tmp_path / "run") == ["samples", "samples/step-000007-00.png"]
