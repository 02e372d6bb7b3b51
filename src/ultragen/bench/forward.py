"""One hierarchical forward of the real FLUX.1-dev architecture (random weights): time, peak memory, finiteness.

``python -m ultragen.bench.forward --sizes 1024 4096 --out bench/results`` writes
``flux-forward-<gpu>-<yyyymmdd>.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ultragen.bench.models import random_flux, random_inputs
from ultragen.bench.record import result_path, write_result
from ultragen.bench.step import median_s
from ultragen.flux import HierFluxTransformer
from ultragen.layout import make_layout
from ultragen.policy import build_plan


def forward_once(hier: HierFluxTransformer, size_px: int, repeats: int = 3) -> dict:
    """Median seconds of one forward (guide cache warm), peak GB, and whether the output is finite."""
    layout = make_layout(size_px, size_px)
    plan = build_plan(layout)
    inputs = random_inputs(hier.transformer, layout.hires_tokens, layout.guide_tokens, layout.text_tokens)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():  # the warm-up call compiles kernels and fills the guide cache
        seconds, out = median_s(lambda: hier(plan=plan, **inputs), repeats)
    hier.clear_guide_cache()
    return {
        "size": f"{size_px}x{size_px}",
        "seq_tokens": layout.seq_tokens,
        "s_per_forward": seconds,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        "finite": bool(torch.isfinite(out).all()),
        "out_std": float(out.float().std()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    hier = HierFluxTransformer(random_flux(), backend=args.backend)
    rows = []
    for size in args.sizes:
        rows.append(forward_once(hier, size))
        print(json.dumps(rows[-1]), flush=True)
    record = {"model": "FLUX.1-dev architecture, random bf16 weights", "backend": args.backend, "batch": 1,
              "rows": rows}
    print(f"wrote {write_result(result_path('flux-forward', args.out), record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
