"""Data-parallel training with two processes (torchrun on the CPU, gloo), as accelerate runs it on several GPUs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_train import make_images, prepare_config
from ultragen.train.prepare import prepare_cache


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed next to this Python")
def test_two_processes_train_one_lora(tmp_path):
    cache = tmp_path / "cache"
    prepare_cache(prepare_config(make_images(tmp_path / "images", 8), cache))
    run = tmp_path / "run"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "-m", "ultragen.cli", "train", "--model", "tiny-random", "--cache",
         str(cache), "--out", str(run), "--steps", "4", "--save-every", "2", "--validate-every", "2",
         "--val-items", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stdout + result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    steps = [json.loads(line)["step"] for line in (run / "loss.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4], "only the main process logs, once per optimizer step"
    lora = load_file(run / "guide_lora.safetensors")
    assert any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k), "the LoRA was trained"
