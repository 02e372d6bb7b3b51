"""Training images: find them, pair them with captions, check them, and cut the image and its guide.

Every problem is found before anything is written, and the error names the file, the rule and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ultragen.train.config import IMAGE_SUFFIXES

CAPTION_KEYS = ("caption", "prompt", "text")
_SHOWN = 5  # problems listed in one error
_ORIENTATION = 0x0112  # EXIF tag


@dataclass(frozen=True)
class Item:
    """One training image: ``path`` (absolute), ``name`` (relative to the image folder, POSIX), its caption."""

    path: Path
    name: str
    caption: str


def _problems(kind: str, problems: list[str], fix: str) -> ValueError:
    shown = "; ".join(problems[:_SHOWN])
    more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return ValueError(f"{len(problems)} {kind}: {shown}{more}; {fix}")


def scan_images(images_dir: str | Path) -> list[tuple[Path, str]]:
    """Sorted (absolute path, relative name) of every image under ``images_dir`` (hidden entries skipped)."""
    root = Path(images_dir).expanduser()
    if not root.exists():
        raise ValueError(f"image folder {str(root)!r} does not exist; pass --images with a folder of images")
    if not root.is_dir():
        raise ValueError(f"--images {str(root)!r} is a file, not a folder; pass the folder that holds the images")
    found = []
    try:
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                path = Path(dirpath) / name
                if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((path.resolve(), path.relative_to(root).as_posix()))
    except PermissionError as error:
        raise ValueError(f"image folder {error.filename!r} cannot be read ({error.strerror}); fix its "
                         f"permissions or pass another folder") from None
    if not found:
        raise ValueError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                         f"put the training images there, each with a NAME.txt caption")
    return sorted(found, key=lambda item: item[1])


def _raise(error: OSError) -> None:
    raise error


def read_caption_file(path: str | Path) -> dict[str, str]:
    """JSONL captions: one ``{"file": NAME, "caption": TEXT}`` object a line (``prompt`` or ``text`` also accepted)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"captions file {str(path)!r} does not exist; pass a JSONL file or use NAME.txt sidecars")
    captions: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"captions file {str(path)!r} cannot be read as UTF-8 text: {error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}); each line must be an object like "
                             f'{{"file": "cat.png", "caption": "a cat"}}') from None
        key = next((k for k in CAPTION_KEYS if isinstance(entry, dict) and k in entry), None)
        if not isinstance(entry, dict) or "file" not in entry or key is None:
            raise ValueError(f"{path}:{number} needs a \"file\" and a \"caption\" key, got {line.strip()[:80]!r}")
        captions[Path(str(entry["file"])).as_posix()] = str(entry[key])
    return captions


def collect_items(images_dir: str | Path, captions_file: str | Path | None = None) -> list[Item]:
    """Every image with its caption: from ``captions_file`` when given, else from the ``NAME.txt`` sidecar."""
    images = scan_images(images_dir)
    table = read_caption_file(captions_file) if captions_file else None
    items, missing = [], []
    for path, name in images:
        if table is not None:
            caption = table.get(name)
            where = f"no entry for {name!r} in {captions_file}"
        else:
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
            where = f"{sidecar} is missing" if caption is None else f"{sidecar} is empty"
        if not caption or not caption.strip():
            missing.append(f"{path} ({where})")
        else:
            items.append(Item(path, name, caption.strip()))
    if missing:
        raise _problems("images without a caption", missing,
                        "write a NAME.txt caption next to each image or pass --captions FILE.jsonl")
    if table is not None and (unknown := sorted(set(table) - {name for _, name in images})):
        raise _problems(f"captions in {captions_file} name no image in {images_dir}", [repr(u) for u in unknown],
                        "fix the \"file\" entries (paths relative to the image folder)")
    return items


def check_images(items: list[Item], size_px: int) -> None:
    """Every image opens and its shortest side is at least ``size_px``; else one error listing the offenders."""
    unreadable, small = [], []
    for item in items:
        try:
            with Image.open(item.path) as image:
                image.load()  # decodes: a truncated file fails here, not halfway through the cache
                width, height = image.size
                if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # stored rotated by 90 degrees
                    width, height = height, width
        except (OSError, UnidentifiedImageError, ValueError) as error:
            unreadable.append(f"{item.path} ({type(error).__name__}: {str(error)[:60]})")
            continue
        if min(width, height) < size_px:
            small.append(f"{item.path} is {width}x{height} px")
    if unreadable:
        raise _problems("unreadable images", unreadable, "remove or re-save them (PNG or JPEG)")
    if small:
        raise _problems(f"images smaller than the training size {size_px} px (shortest side)", small,
                        "remove them, use larger images, or pass a smaller --size")


def load_square(path: Path, size_px: int) -> Image.Image:
    """RGB image, shortest side resized to ``size_px`` (antialiased), centre-cropped to ``size_px`` x ``size_px``."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    width, height = image.size
    scale = size_px / min(width, height)
    if scale != 1:
        new = (max(size_px, round(width * scale)), max(size_px, round(height * scale)))
        image = image.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (image.width - size_px) // 2, (image.height - size_px) // 2
    return image.crop((left, top, left + size_px, top + size_px))


def guide_image(image: Image.Image, rho: int) -> Image.Image:
    """The guide: ``image`` downsampled by ``rho`` per side with an antialiasing (Lanczos) filter."""
    if image.width % rho or image.height % rho:
        raise ValueError(f"image {image.width}x{image.height} px is not divisible by rho={rho}")
    return image.resize((image.width // rho, image.height // rho), Image.Resampling.LANCZOS, reducing_gap=3.0)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) float32 in [-1, 1] (the VAE's input range)."""
    arrays = [torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
              for im in images]
    return torch.stack(arrays).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
