"""A PNG of a step benchmark: seconds per step and peak memory against resolution (log scales)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_step_result(result_path: str | Path, png_path: str | Path | None = None) -> Path:
    """Plot ``bench/results/step-*.json`` next to it (same name, .png). Needs matplotlib (``ultragen[bench]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result_path = Path(result_path)
    record = json.loads(result_path.read_text())
    png_path = Path(png_path) if png_path else result_path.with_suffix(".png")
    series: dict[str, dict[int, tuple[float, float]]] = {}
    for row in record["rows"]:
        name = f"{row['mode']} {row['backend']}" + (" compiled" if row["compile"] else "") + (" fp8" if row["fp8"] else "")
        if row.get("ff_chunk_tokens"):  # absent in results written before the variant existed
            name += f" ff-chunk {row['ff_chunk_tokens']}"
        if row["mode"] == "hier" and row.get("guide_cache") is False:
            name += " no guide cache"
        side = int(row["size"].split("x")[0])
        best = series.setdefault(name, {}).get(side)
        if best is None or row["s_per_step"] < best[0]:
            series[name][side] = (row["s_per_step"], row["peak_gb"])
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.cm.tab20.colors  # more series than the default cycle's 10 colours
    for i, (name, points) in enumerate(sorted(series.items())):
        sides = sorted(points)
        style = dict(linestyle="--" if name.startswith("dense") else "-", marker="o", label=name,
                     color=colors[i % len(colors)])
        ax_time.plot(sides, [points[s][0] for s in sides], **style)
        ax_mem.plot(sides, [points[s][1] for s in sides], **style)
    for ax, label in ((ax_time, "seconds per transformer step"), (ax_mem, "peak GPU memory (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image side (px), square")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=7)
    fig.suptitle(f"FLUX.1-dev architecture, batch 1, {record.get('gpu', '')}, torch {record.get('torch', '')}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
