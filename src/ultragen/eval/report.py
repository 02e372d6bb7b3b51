"""The report folder, written atomically (it appears complete or not at all): metrics.json (every figure with its
sample count and settings), crops.png (sample crops of both sets), plot.svg and report.html (which shows both)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ultragen.atomic import atomic_folder
from ultragen.eval.run import THUMB_PX, EvalResult

GRID_COLUMNS = 8
PLOT_W, PLOT_H, PAD = 360, 240, 36
COLORS = {"generated": "#d1495b", "reference": "#00798c"}


def write_report(result: EvalResult, out: Path) -> None:
    """Write the four files into ``out`` (replacing an existing report only once the new one is complete)."""
    with atomic_folder(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
        grid = crops_grid(result.thumbs)
        if grid is not None:
            grid.save(tmp / "crops.png")
        svg = plot_svg(result)
        (tmp / "plot.svg").write_text(svg)
        (tmp / "report.html").write_text(report_html(result, svg, grid is not None))


def crops_grid(thumbs: dict[str, list[torch.Tensor]]) -> Image.Image | None:
    """One row block per set, GRID_COLUMNS crops wide, 4 px gaps. None if there is no crop."""
    rows = [(name, crops[i:i + GRID_COLUMNS]) for name, crops in thumbs.items()
            for i in range(0, len(crops), GRID_COLUMNS)]
    if not rows:
        return None
    gap = 4
    canvas = Image.new("RGB", (GRID_COLUMNS * (THUMB_PX + gap) + gap, len(rows) * (THUMB_PX + gap) + gap), "white")
    for r, (name, crops) in enumerate(rows):
        for c, crop in enumerate(crops):
            tile = Image.fromarray(crop.permute(1, 2, 0).numpy())
            canvas.paste(tile, (gap + c * (THUMB_PX + gap), gap + r * (THUMB_PX + gap)))
    return canvas


def plot_svg(result: EvalResult) -> str:
    """Side-by-side panels: the whole-image Inception features of both sets on their first two principal axes
    (what FID compares), and a histogram per per-image metric (CLIP score, CLIP-IQA)."""
    panels = []
    if result.features:
        panels.append(_scatter_panel(result.features))
    for name, values in result.per_image.items():
        panels.append(_histogram_panel(name, values))
    if not panels:
        panels.append(_text_panel("no whole-image feature or per-image metric to plot"))
    body = "".join(f'<g transform="translate({i * (PLOT_W + 10)},0)">{p}</g>' for i, p in enumerate(panels))
    width = len(panels) * (PLOT_W + 10)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PLOT_H}" font-family="sans-serif" '
            f'font-size="11">{body}</svg>\n')


def _frame(title: str) -> str:
    return (f'<rect x="{PAD}" y="{PAD // 2}" width="{PLOT_W - PAD - 8}" height="{PLOT_H - 1.5 * PAD}" fill="none" '
            f'stroke="#888"/><text x="{PLOT_W // 2}" y="12" text-anchor="middle">{html.escape(title)}</text>')


def _scale(values: np.ndarray, lo_px: float, hi_px: float) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo if hi > lo else 1.0
    return lo_px + (values - lo) / span * (hi_px - lo_px)


def _scatter_panel(features: dict[str, torch.Tensor]) -> str:
    """PCA of the pooled features of both sets together; one colour per set."""
    names = list(features)
    stacked = torch.cat([features[n].double() for n in names])
    centred = stacked - stacked.mean(0)
    if len(stacked) >= 2:
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy = (centred @ v[:2].T).numpy()
    else:
        xy = np.zeros((len(stacked), 2))
    if xy.shape[1] < 2:
        xy = np.concatenate([xy, np.zeros((len(xy), 2 - xy.shape[1]))], axis=1)
    px = _scale(xy[:, 0], PAD + 6, PLOT_W - 14)
    py = _scale(-xy[:, 1], PAD // 2 + 6, PLOT_H - PAD - 6)
    dots, start = [], 0
    for name in names:
        n = len(features[name])
        dots += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{COLORS[name]}" fill-opacity="0.6"/>'
                 for x, y in zip(px[start:start + n], py[start:start + n])]
        start += n
    legend = "".join(f'<text x="{PAD + 4}" y="{PLOT_H - 6 - 12 * i}" fill="{COLORS[n]}">{n} ({len(features[n])})'
                     f'</text>' for i, n in enumerate(names))
    return _frame("Inception features, first two principal axes") + "".join(dots) + legend


def _histogram_panel(name: str, values: list[float], bins: int = 20) -> str:
    array = np.asarray(values, dtype=float)
    counts, edges = np.histogram(array, bins=bins)
    top = max(int(counts.max()), 1)
    x0, x1, y0, y1 = PAD, PLOT_W - 8, PLOT_H - PAD, PAD // 2
    width = (x1 - x0) / bins
    bars = "".join(f'<rect x="{x0 + i * width:.1f}" y="{y0 - (y0 - y1) * c / top:.1f}" width="{width - 1:.1f}" '
                   f'height="{(y0 - y1) * c / top:.1f}" fill="{COLORS["generated"]}"/>' for i, c in enumerate(counts))
    axis = (f'<text x="{x0}" y="{y0 + 14}">{edges[0]:.3g}</text>'
            f'<text x="{x1}" y="{y0 + 14}" text-anchor="end">{edges[-1]:.3g}</text>'
            f'<text x="{x0 - 4}" y="{y1 + 10}" text-anchor="end">{top}</text>')
    mean = float(array.mean()) if len(array) else math.nan
    return _frame(f"{name} per image (n={len(array)}, mean {mean:.4g})") + bars + axis


def _text_panel(text: str) -> str:
    return f'<text x="10" y="{PLOT_H // 2}">{html.escape(text)}</text>'


def report_html(result: EvalResult, svg: str, has_crops: bool) -> str:
    metrics = result.metrics["metrics"]
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{entry['value']:.4f}</td>"
        f"<td>{_samples(entry)}</td><td>{html.escape(_details(entry))}</td></tr>" for name, entry in metrics.items())
    sets = "".join(f"<li>{html.escape(name)}: {info['images']} images from <code>{html.escape(info['folder'])}"
                   f"</code>, sizes {html.escape(', '.join(f'{n}x {s}' for s, n in info['sizes'].items()))}</li>"
                   for name, info in result.metrics["sets"].items())
    crops = ('<h2>Sample crops</h2><p>First crop of the first images, by the patch protocol (top: generated, then '
             'reference).</p><img src="crops.png" alt="sample crops">') if has_crops else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ultragen eval</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px;text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>ultragen eval</h1>
<ul>{sets}</ul>
<table><tr><th>metric</th><th>value</th><th>samples</th><th>settings</th></tr>{rows}</table>
<p>All figures, settings and per-image values: <a href="metrics.json">metrics.json</a>.
Evaluation took {result.metrics['seconds']:.1f} s.</p>
<h2>Plot</h2>{svg}
{crops}
</body></html>
"""


def _samples(entry: dict) -> str:
    if "generated_samples" in entry:
        return f"{entry['generated_samples']} vs {entry['reference_samples']} {entry['unit']}"
    return f"{entry['samples']} {entry['unit']}"


def _details(entry: dict) -> str:
    skip = {"value", "samples", "generated_samples", "reference_samples", "unit"}
    return ", ".join(f"{k}={v}" for k, v in entry.items() if k not in skip)
