"""``ultragen generate --parallel`` as torchrun runs it, on forked gloo processes: the same image as one process, and
a rank that fails stops the others within seconds, leaving no file."""

import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from parallel_ranks import run_ranks, start_ranks
from ultragen.parallel import SequenceParallel
from ultragen.parallel.launch import generate_files_parallel
from ultragen.pipeline.config import GenerationConfig
from ultragen.pipeline.job import generate_files, prepare_generation

# 768 px: 3 x 3 windows of 16 tokens, split 4/5 over two processes; tiny-random has 2 heads
CONFIG = GenerationConfig(768, 768, model="tiny-random", steps=3, guide_steps=2, warm_start_skip=1)


def job(out):
    return prepare_generation(CONFIG, "a red fox", None, str(out), device="cpu", log=lambda _: None)


def latent(path):
    return load_file(path)["latent"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    one = job(tmp_path_factory.mktemp("one") / "fox.png")
    generate_files(one, progress=False, log=lambda _: None)
    return one.outputs[0]


@pytest.mark.parametrize("mode", ["ulysses", "halo"])
def test_two_processes_write_the_image_one_process_writes(one_process, tmp_path, mode, monkeypatch):
    out = tmp_path / "fox.png"
    two = job(out)
    calls = []
    attend = SequenceParallel.attend
    monkeypatch.setattr(SequenceParallel, "attend", lambda *a, **k: calls.append(1) or attend(*a, **k))

    def rank_run(rank, world):
        generate_files_parallel(two, mode, progress=False, log=lambda _: None)
        return len(calls)

    assert min(run_ranks(2, rank_run)) > 0, "the hires pass ran through the parallel attention on every rank"
    torch.testing.assert_close(latent(two.outputs[0].latent), latent(one_process.latent), rtol=1e-5, atol=1e-5)
    pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in (out, one_process.image)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1, "one 8-bit level of rounding at most"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.json", "fox.latent.safetensors", "fox.png"]


@pytest.mark.parametrize("where", ["attend", "writes_files"])  # mid hires pass; after the last step, before writing
def test_a_failing_rank_stops_the_others_within_seconds_and_no_file_is_written(one_process, tmp_path, capfd,
                                                                               monkeypatch, where):
    # one_process: the parent has imported and built everything once, so the forked ranks start at once
    out = tmp_path / "fox.png"
    two = job(out)
    calls = []
    original = getattr(SequenceParallel, where)

    def fail_on_rank_1(self, *args, **kwargs):
        calls.append(1)
        if self.rank == 1 and (where == "writes_files" or len(calls) == 3):  # rank 0 then waits in a collective
            raise RuntimeError("out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SequenceParallel, where, fail_on_rank_1)  # inherited by the forked ranks
    procs, _ = start_ranks(2, lambda rank, world: generate_files_parallel(two, "ulysses", progress=False))
    exited = [None, None]  # when each rank's process ended
    deadline = time.monotonic() + 60
    while None in exited and time.monotonic() < deadline:
        for rank, p in enumerate(procs):
            if exited[rank] is None and p.exitcode is not None:
                exited[rank] = time.monotonic()
        time.sleep(0.05)
    for p in procs:
        p.kill()
    assert [p.exitcode for p in procs] == [1, 1]
    assert exited[0] - exited[1] < 5, f"rank 0 ran on {exited[0] - exited[1]:.1f} s after rank 1 failed"
    assert list(tmp_path.iterdir()) == [], "no file, partial or whole"
    errors = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert errors == ["ultragen generate: error on rank 1 of 2: out of memory (simulated)"], errors


def test_parallel_outside_torchrun_says_how_to_start_it(tmp_path, capsys, monkeypatch):
    from ultragen.cli import main

    monkeypatch.delenv("RANK", raising=False)
    status = main(["generate", "--model", "tiny-random", "--prompt", "a fox", "--width", "768", "--height", "768",
                   "--out", str(tmp_path / "fox.png"), "--parallel", "halo", "--quiet"])
    assert status == 2
    assert "torchrun --nproc-per-node N -m ultragen.cli generate" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
