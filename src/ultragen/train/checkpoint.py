"""Resumable checkpoints, written atomically, checked on read, the last two kept.

One checkpoint is the folder ``RUN_DIR/checkpoints/step-NNNNNN/``::

    lora.safetensors     the guide LoRA with its metadata (usable directly with `ultragen generate --lora`)
    optimizer.pt         optimizer state (torch.save; read back with weights_only=True)
    training_state.pt    LR scheduler state and the torch CPU/CUDA RNG states
    state.json           step, process count, the run config, the loss history, Python/NumPy RNG states
    checkpoint.json      written last: the size and SHA-256 of every file above

It is built in a hidden temporary folder next to it, every file fsynced, then renamed into place: a crash leaves
either no checkpoint or a whole one. Reading checks every file against ``checkpoint.json``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ultragen.atomic import atomic_folder
from ultragen.flux.lora import LoraMetadata, save_guide_lora

CHECKPOINTS = "checkpoints"
INDEX = "checkpoint.json"
KEEP = 2
_PREFIX = "step-"
_FILES = ("lora.safetensors", "optimizer.pt", "training_state.pt", "state.json")


@dataclass
class Checkpoint:
    path: Path
    step: int
    lora_path: Path
    optimizer: dict
    scheduler: dict
    rng: dict
    state: dict  # state.json: step, world_size, config, history, python/numpy RNG


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders of interrupted writes are not listed)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _numpy_state() -> list | None:
    try:
        import numpy as np
    except ImportError:
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def rng_snapshot() -> tuple[dict, dict]:
    """(tensors for training_state.pt, JSON-ready states for state.json)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state_all()
    state = random.getstate()
    return tensors, {"python": [state[0], list(state[1]), state[2]], "numpy": _numpy_state()}


def restore_rng(tensors: dict, states: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = tensors.get("torch_cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if states.get("numpy") is not None:
        import numpy as np

        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(run_dir: Path, step: int, transformer, metadata: LoraMetadata, optimizer, scheduler,
                    state: dict) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest KEEP. Returns its folder."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    if final.exists():
        raise ValueError(f"checkpoint {str(final)!r} already exists; it is never overwritten (remove it to redo it)")
    with atomic_folder(final) as tmp:
        save_guide_lora(transformer, tmp / "lora.safetensors", metadata)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng_tensors, rng_states = rng_snapshot()
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_tensors}, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_states}) + "\n")
        index = {"step": step, "files": {}}
        for name in _FILES:
            index["files"][name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for old in list_checkpoints(run_dir)[:-KEEP]:
        shutil.rmtree(old)
    return final


def _corrupt(path: Path, why: str, folder: Path) -> ValueError:
    older = [p for p in list_checkpoints(folder.parent.parent) if p != folder]
    fix = (f"delete {str(folder)!r} to resume from {str(older[-1])!r}" if older
           else f"delete {str(folder)!r} and start the run again")
    return ValueError(f"checkpoint file {str(path)!r} is corrupt ({why}); {fix}")


def verify_checkpoint(folder: Path) -> dict:
    """The checkpoint's index after checking every file's size and SHA-256; ValueError naming a bad file."""
    index_path = folder / INDEX
    try:
        index = json.loads(index_path.read_text())
        files = index["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _corrupt(index_path, f"unreadable index: {type(error).__name__}", folder) from None
    for name in _FILES:
        path = folder / name
        if name not in files or not path.is_file():
            raise _corrupt(path, "missing", folder)
        if path.stat().st_size != files[name]["bytes"]:
            raise _corrupt(path, f"{path.stat().st_size} bytes, {files[name]['bytes']} were written", folder)
        if _sha256(path) != files[name]["sha256"]:
            raise _corrupt(path, "its SHA-256 differs from the one recorded when it was written", folder)
    return index


def load_checkpoint(folder: Path) -> Checkpoint:
    """Read and check one checkpoint folder (tensors stay on the CPU)."""
    verify_checkpoint(folder)
    try:
        optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        training = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
        state = json.loads((folder / "state.json").read_text())
    except Exception as error:  # torch.load raises several types for damaged pickles
        raise _corrupt(folder, f"cannot be loaded: {type(error).__name__}: {str(error)[:80]}", folder) from None
    return Checkpoint(folder, int(state["step"]), folder / "lora.safetensors", optimizer, training["scheduler"],
                      {"tensors": training["rng"], "states": state["rng"]}, state)
