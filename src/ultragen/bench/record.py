"""Where benchmark results go and what every result file records about the machine."""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
from pathlib import Path

import torch

from ultragen.atomic import atomic_path


def gpu_slug() -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (file names of results)."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def environment() -> dict:
    """GPU name and software versions, for every result file."""
    record = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": dt.date.today().isoformat(),
              "python": platform.python_version()}
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        pass
    return record


def result_path(kind: str, directory: str | Path = "bench/results") -> Path:
    """bench/results/<kind>-<gpu>-<yyyymmdd>.json"""
    return Path(directory) / f"{kind}-{gpu_slug()}-{dt.date.today():%Y%m%d}.json"


def write_result(path: str | Path, record: dict) -> Path:
    """``record`` with the :func:`environment` as JSON at ``path``, written atomically (never a partial file)."""
    text = json.dumps({**environment(), **record}, indent=1) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
