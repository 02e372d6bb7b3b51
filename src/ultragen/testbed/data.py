"""``ultragen testbed data``: write scenes as a folder of PNGs with caption sidecars and their ground truth.

``OUT/NNNNNNNNNN.png`` (the base render; with ``scales`` also ``NNNNNNNNNN@4x.png``), ``OUT/NNNNNNNNNN.txt`` (the
caption, the format ``ultragen train`` reads) and ``OUT/scenes.jsonl`` (one scene a line: seed, caption and every
object's shape, colour, cell, size and offset: the detector's ground truth). Names are the scene seeds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from ultragen.atomic import atomic_path
from ultragen.testbed.scenes import render, sample_scene


def write_scenes(out_dir: str | Path, seeds: range, size_px: int, scales: tuple[int, ...] = (1,),
                 force: bool = False) -> Iterator[Path]:
    """Render and write the scenes of ``seeds``; yields each base PNG path as it is written.

    Every file is written atomically; ``scenes.jsonl`` appears only once every scene is written, so a stopped run
    leaves whole images and no index (and is not taken for a finished scene set)."""
    out = Path(out_dir)
    index = out / "scenes.jsonl"
    if index.exists() and not force:
        raise ValueError(f"{out} already holds a scene set ({index.name}); pass another folder or --force")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(index) as tmp_index, open(tmp_index, "w") as f:
        for seed in seeds:
            scene = sample_scene(seed)
            for scale in scales:
                suffix = "" if scale == 1 else f"@{scale}x"
                image = render(scene, size_px * scale)
                with atomic_path(out / f"{seed:010d}{suffix}.png") as tmp:
                    Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp, format="PNG")
            with atomic_path(out / f"{seed:010d}.txt") as tmp:
                tmp.write_text(scene.caption + "\n")
            f.write(json.dumps({"seed": seed, "caption": scene.caption, **_plain(asdict(scene))}) + "\n")
            yield out / f"{seed:010d}.png"


def _plain(value):
    """Enums to their values, tuples to lists (JSON)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return getattr(value, "value", value)
