"""The run folder of ``ultragen train --out RUN_DIR``: what is in it, and what a new or resumed run may do to it.

    RUN_DIR/config.json              the run's TrainConfig (first start; a resume must agree with it)
    RUN_DIR/loss.jsonl               append-only log: {"step", "loss", "lr", ...}, {"step", "val_loss"}, and
                                     {"event": "resume", "step"} markers; read_loss_log gives the effective curve
    RUN_DIR/checkpoints/step-NNNNNN/ see ultragen.train.checkpoint (the last two are kept)
    RUN_DIR/samples/                 validation images (with --validate-prompts)
    RUN_DIR/guide_lora.safetensors   the final LoRA with its metadata
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ultragen.train.cache import write_text_atomic
from ultragen.train.checkpoint import list_checkpoints
from ultragen.train.config import TrainConfig

CONFIG = "config.json"
LOSS_LOG = "loss.jsonl"
FINAL_LORA = "guide_lora.safetensors"


def check_run_dir(run_dir: Path, config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None: a fresh run). Refuses to overwrite: a folder with checkpoints or a
    final LoRA needs --resume; --resume needs a checkpoint and the same settings."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {str(run_dir)!r} is a file; pass a folder for the run")
    checkpoints = list_checkpoints(run_dir)
    final = run_dir / FINAL_LORA
    if not config.resume:
        if checkpoints or final.exists():
            found = str(checkpoints[-1]) if checkpoints else str(final)
            raise ValueError(f"run folder {str(run_dir)!r} already holds a run ({found}); pass --resume to continue "
                             f"it or choose a new --out (nothing is overwritten)")
        return None
    if not checkpoints:
        raise ValueError(f"--resume: run folder {str(run_dir)!r} has no checkpoint to resume from; drop --resume "
                         f"to start a new run there")
    saved = read_run_config(run_dir)
    if saved is not None and (diff := config.differences(saved)):
        raise ValueError(f"--resume with other settings than {run_dir / CONFIG} ({'; '.join(diff)}); only "
                         f"{', '.join(TrainConfig.RESUMABLE)} may change; use the saved settings or a new --out")
    return checkpoints[-1]


def read_run_config(run_dir: Path) -> TrainConfig | None:
    path = run_dir / CONFIG
    if not path.is_file():
        return None
    try:
        return TrainConfig.from_record(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise ValueError(f"run config {str(path)!r} cannot be read ({error}); fix or delete it") from None


def write_run_config(run_dir: Path, config: TrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG, json.dumps(config.to_record(), indent=2) + "\n")


def append_log(run_dir: Path, record: dict) -> None:
    with open(run_dir / LOSS_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_loss_log(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """The effective curves {"loss": {step: value}, "val_loss": {step: value}}: later lines win, so steps redone
    after a resume replace the ones the interrupted run logged past its last checkpoint."""
    curves: dict[str, dict[int, float]] = {"loss": {}, "val_loss": {}}
    path = Path(run_dir) / LOSS_LOG
    if not path.is_file():
        return curves
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key in curves:
            if key in record:
                curves[key][record["step"]] = record[key]
    return curves


def retire_final_lora(run_dir: Path, step: int) -> Path | None:
    """On resume, keep a finished run's LoRA under a step-stamped name instead of overwriting it later."""
    final = run_dir / FINAL_LORA
    if not final.exists():
        return None
    kept = run_dir / f"guide_lora.step-{step:06d}.safetensors"
    if kept.exists():
        raise ValueError(f"{str(kept)!r} already exists; move it away before resuming")
    os.replace(final, kept)
    return kept
