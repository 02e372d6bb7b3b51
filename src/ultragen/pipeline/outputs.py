"""Where results go and how they are written: planned and checked before any model loads, written atomically.

Every image ``NAME.png`` (prompt, seed, model and the resolved settings in PNG text chunks) comes with
``NAME.json`` (the full record) and ``NAME.latent.safetensors`` (the final latent, written before decoding). A file is
first written under a temporary name in the same folder and renamed into place, so a failure never leaves a partial
output file behind; existing files are not overwritten unless ``force``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ultragen.atomic import atomic_path

MAX_SLUG_CHARS = 48


@dataclass(frozen=True)
class OutputPaths:
    """The three files of one image."""

    image: Path
    sidecar: Path
    latent: Path

    @classmethod
    def for_image(cls, image: Path) -> OutputPaths:
        stem = image.with_suffix("")
        return cls(image, stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".latent.safetensors"))

    def all(self) -> tuple[Path, Path, Path]:
        return self.image, self.sidecar, self.latent


def slug(prompt: str) -> str:
    """A short file-name-safe version of a prompt: 'A red fox!' -> 'a-red-fox'."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:MAX_SLUG_CHARS].rstrip("-") or "image"


def plan_outputs(out: str | os.PathLike | None, prompts: list[str], seeds: list[int], force: bool) -> list[OutputPaths]:
    """The files each prompt will produce. ``out``: a ``.png`` file (one prompt) or a folder (None: the current one).

    Raises ValueError if a file exists (without ``force``), the place is not writable, or ``out`` is a file name
    that cannot hold several prompts. Creates nothing."""
    target = Path(out if out is not None else ".").expanduser()
    if target.suffix.lower() == ".png":
        if len(prompts) > 1:
            raise ValueError(f"--out {str(target)!r} is one file but there are {len(prompts)} prompts; "
                             f"pass a folder instead")
        planned = [OutputPaths.for_image(target)]
    elif target.suffix and not target.is_dir():
        raise ValueError(f"--out {str(target)!r}: only PNG is written (the settings live in its text chunks); "
                         f"use a .png file name or a folder")
    else:
        if target.exists() and not target.is_dir():
            raise ValueError(f"--out {str(target)!r} exists and is not a folder; pass a folder or a .png file name")
        many = len(prompts) > 1
        planned = [OutputPaths.for_image(target / (f"{i:03d}-" * many + f"{slug(p)}-s{s}.png"))
                   for i, (p, s) in enumerate(zip(prompts, seeds))]
    _check_unique(planned)
    for paths in planned:
        check_writable(paths.image.parent)
        for path in paths.all():
            if path.exists() and not force:
                raise ValueError(f"{str(path)!r} already exists; pass --force to overwrite it or choose another --out")
    return planned


def _check_unique(planned: list[OutputPaths]) -> None:
    images = [p.image for p in planned]
    if len(set(images)) != len(images):
        raise ValueError("two prompts would write the same file; give them different seeds or texts")


def check_writable(folder: Path) -> None:
    """Raise ValueError unless files can be created in ``folder`` (or in the folder it would be created in)."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write to {str(folder)!r}: {str(existing)!r} is a file, not a folder; "
                         f"choose another --out")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ultragen-probe-"):
            pass
    except OSError as error:
        raise ValueError(f"cannot write to {str(folder)!r} ({error.strerror or error}); choose another --out "
                         f"or fix the folder's permissions") from None


def png_text(record: dict) -> dict[str, str]:
    """The PNG text chunks of one image: prompt, seed, model, the settings as JSON and, when any LoRA was used, the
    LoRA files as JSON (kind, path, SHA-256, scale)."""
    text = {
        "prompt": record["prompt"],
        "seed": str(record["config"]["seed"]),
        "model": record["config"]["model"],
        "ultragen_config": json.dumps(record["config"], sort_keys=True),
        "Software": f"ultragen {record['versions']['ultragen']}",
    }
    if record.get("lora_files"):
        text["lora_files"] = json.dumps(record["lora_files"])
    return text


def write_png(path: Path, image: Image.Image, text: dict[str, str]) -> None:
    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def write_json(path: Path, record: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
