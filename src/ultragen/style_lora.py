"""Style LoRAs: the user's own LoRA files, named on the command line as ``FILE[:SCALE]``, read safely and hashed.

This module knows nothing about a model family: it parses the option, refuses what is not a safetensors file (pickle
formats are never opened: unpickling runs code), reads the tensors and computes the SHA-256 that each image's record
names. Converting the keys to diffusers' layout and loading the adapter is the family's job
(``ultragen.flux.style_lora``), which uses diffusers' own converters (diffusers/PEFT, kohya, XLabs, ...).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class StyleLoraSpec:
    """One style LoRA as the user named it: a .safetensors file and the scale its adapter runs at (1: as trained)."""

    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"style LoRA {self.path!r}: scale {self.scale!r} is not a finite number; pass e.g. "
                             f"--style-lora {self.path}:0.8 (1 = as trained)")
        object.__setattr__(self, "path", str(self.path))
        object.__setattr__(self, "scale", float(self.scale))


@dataclass(frozen=True)
class StyleLoraFile:
    """A style LoRA file as read: its tensors under the file's own keys, its SHA-256 and safetensors metadata."""

    spec: StyleLoraSpec
    sha256: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def record(self) -> dict:
        """What an image's record says about this LoRA: the file (absolute path), its SHA-256 and its scale."""
        return {"path": str(Path(self.spec.path).resolve()), "sha256": self.sha256, "scale": self.spec.scale}


def parse_style_lora(text: str) -> StyleLoraSpec:
    """``"FILE"`` or ``"FILE:SCALE"`` -> a spec; raises ValueError (one line) for an empty value or a scale that is
    not a number. The scale is what follows the last ``:`` unless that part holds a path separator (so Windows
    drive letters and folders with ``:`` stay in the path); a file whose name has a ``:`` needs an explicit scale."""
    if not text or not text.strip():
        raise ValueError("--style-lora needs a value: FILE.safetensors or FILE.safetensors:SCALE, e.g. "
                         "style.safetensors:0.8")
    path, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail:
        return StyleLoraSpec(text)
    if not path:
        raise ValueError(f"--style-lora {text!r} has no file before the ':'; pass FILE.safetensors:SCALE")
    try:
        scale = float(tail)
    except ValueError:
        raise ValueError(f"--style-lora {text!r}: scale {tail!r} is not a number; pass FILE.safetensors:SCALE with "
                         f"SCALE a number such as 0.8 (a file name with ':' needs a scale, e.g. FILE:1)") from None
    return StyleLoraSpec(path, scale)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def check_style_lora_path(spec: StyleLoraSpec) -> Path:
    """The path, if it names an existing .safetensors file; ValueError otherwise (pickle files are refused unread)."""
    path = Path(spec.path).expanduser()
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(f"style LoRA {spec.path!r} is a {suffix} (pickle) file, which can run code when read; only "
                         f"{SUFFIX} files are accepted: convert it to safetensors where you trust it, or get the "
                         f"{SUFFIX} release")
    if suffix != SUFFIX:
        raise ValueError(f"style LoRA {spec.path!r} is not a {SUFFIX} file; pass a LoRA saved as safetensors")
    if not path.is_file():
        raise ValueError(f"style LoRA {spec.path!r} does not exist; pass the path of a {SUFFIX} LoRA file")
    return path


def read_style_lora(spec: StyleLoraSpec) -> StyleLoraFile:
    """Read the file with safetensors (never pickle) and hash it; ValueError naming the file for anything wrong."""
    from safetensors import safe_open

    path = check_style_lora_path(spec)
    sha256 = file_sha256(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt or truncated files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"style LoRA {spec.path!r} is not a readable safetensors file (corrupt or truncated?): "
                         f"{reason}") from None
    if not tensors:
        raise ValueError(f"style LoRA {spec.path!r} holds no tensors; pass a LoRA file")
    return StyleLoraFile(spec, sha256, tensors, metadata)
