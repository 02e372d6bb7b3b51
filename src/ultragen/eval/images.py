"""Reading image folders: which files, their sizes (from the headers, cheap) and their pixels (one at a time)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ImageRecord:
    """One image file: its path, size and the prompt stored in its PNG text chunk (None if there is none)."""

    path: Path
    width_px: int
    height_px: int
    embedded_prompt: str | None

    @property
    def size(self) -> tuple[int, int]:
        return self.width_px, self.height_px


def natural_key(path: Path) -> list:
    """Sort key comparing digit runs as numbers: 2.png < 10.png < 1000-a.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def scan_folder(folder: Path, option: str) -> list[ImageRecord]:
    """The PNG/JPEG files directly in ``folder`` in natural name order, each opened to read its header.

    Raises ValueError (naming ``option``) for a folder without images or a file that is not a readable image."""
    folder = Path(folder)
    paths = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=natural_key)
    if not paths:
        raise ValueError(f"{option} {str(folder)!r} holds no .png/.jpg/.jpeg file; point it at the image folder")
    return [_read_header(p, option) for p in paths]


def _read_header(path: Path, option: str) -> ImageRecord:
    try:
        with Image.open(path) as image:
            width, height = image.size
            prompt = image.info.get("prompt")  # text chunks before the pixels (PIL writes them there); .text decodes
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{option}: {str(path)!r} is not a readable image ({error}); remove or replace it") from None
    return ImageRecord(path, width, height, prompt)


def load_uint8(record: ImageRecord) -> torch.Tensor:
    """The image as RGB uint8, shape [3, H, W]. Raises ValueError if the pixels cannot be decoded."""
    try:
        with Image.open(record.path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{str(record.path)!r} could not be decoded ({error}); remove or replace it") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def size_counts(records: list[ImageRecord]) -> dict[str, int]:
    """{"WxH": count}, most common first."""
    counts: dict[str, int] = {}
    for r in records:
        key = f"{r.width_px}x{r.height_px}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
