"""The README is the front door: its commands are CI's, its Python blocks run as written, its training smoke run
(prepare -> train -> generate with that LoRA) works end to end."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ('pip install "torch==2.13.0" -e ".[test]"', "python -m pytest -q"):
        assert command in README and command in ci


PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def _smoke_run_commands() -> list[list[str]]:
    """The bash block of the README's training smoke run, one argv per command (continuations joined)."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S) if "train prepare --model tiny-random" in b)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_training_smoke_run_works_end_to_end(tmp_path, monkeypatch, capsys):
    from ultragen.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "data").mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (128, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / f"{i}.png")
        (tmp_path / "data" / f"{i}.txt").write_text(f"picture {i}")
    commands = _smoke_run_commands()
    assert [c[:2] for c in commands] == [["ultragen", "train"], ["ultragen", "train"], ["ultragen", "generate"]]
    for argv in commands:
        argv = [a.replace("/tmp/", f"{tmp_path}/") for a in argv[1:]]  # the README's /tmp/c, /tmp/r here
        if argv[0] != "train" or argv[1] != "prepare":
            argv.append("--quiet")
        assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "settings from the LoRA: rho=2, window_tokens=4" in err and "block_tokens=16" in err
    record = json.loads((tmp_path / "fox-lora.json").read_text())
    assert (record["config"]["rho"], record["config"]["window_tokens"], record["config"]["block_tokens"]) == (2, 4, 16)
    assert record["lora"]["window_tokens"] == 4
    assert Image.open(tmp_path / "fox-lora.png").size == (256, 256)
