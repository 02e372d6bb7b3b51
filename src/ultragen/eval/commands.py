"""The ``ultragen eval`` subcommand: flags -> EvalConfig -> evaluate -> report folder.

Registered by ``ultragen.cli.build_parser``; the options are added only when ``ultragen eval`` is used, and heavy
modules (torch, torchmetrics, transformers) are imported only when the command runs. Bad input raises ValueError,
which the CLI prints as one line (exit 2); no report is written then."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ultragen.cli import whole_number

METRICS_HELP = "comma list of fid,is,clip,clipiqa,fid_patch,is_patch, or all (default; the FIDs only with --reference)"


def add_eval_parser(commands) -> None:
    commands.add_parser(
        "eval", help="the paper's metrics (FID, IS, CLIP score, CLIP-IQA, FID/IS on patches) on image folders",
        description="ultragen eval --images DIR [--reference DIR] --out REPORT_DIR [options]: writes metrics.json, "
                    "report.html, plot.svg and crops.png to REPORT_DIR. Weights are read from local paths only.",
        add_arguments=_eval_arguments)


def _eval_arguments(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--images", required=True, type=Path, help="folder of generated PNG/JPEG images")
    ev.add_argument("--reference", type=Path, help="folder of real images for FID and FID_patch")
    ev.add_argument("--prompts", type=Path, help="text file, one prompt per image in natural name order (default: "
                                                 "the prompt stored in each PNG by ultragen generate)")
    ev.add_argument("--out", required=True, type=Path, help="report folder to create")
    ev.add_argument("--force", action="store_true", help="replace an existing report folder")
    ev.add_argument("--metrics", default="all", help=METRICS_HELP)
    ev.add_argument("--patch-size", type=whole_number, default=1024, help="patch side in pixels (default 1024)")
    ev.add_argument("--patch-layout", choices=["random", "grid"], default="random",
                    help="random: --patches-per-image seeded crops; grid: every whole tile (default random)")
    ev.add_argument("--patches-per-image", type=whole_number, help="random crops per image (default 4)")
    ev.add_argument("--fid-features", type=whole_number, default=2048, help="Inception feature width: 64, 192, "
                                                                           "768 or 2048 (default, the standard)")
    ev.add_argument("--is-splits", type=whole_number, default=10, help="Inception Score splits (default 10)")
    ev.add_argument("--inception-weights", type=Path, help="local weights-inception-2015-12-05-6726825d.pth")
    ev.add_argument("--clip-model", type=Path, help="local Hugging Face CLIP folder (openai/clip-vit-large-patch14)")
    ev.add_argument("--seed", type=whole_number, default=0, help="patch positions and IS split shuffle (default 0)")
    ev.add_argument("--device", default="auto", help="auto (default: cuda if present), cpu, cuda, cuda:N")
    ev.add_argument("--batch-size", type=whole_number, default=8, help="images or patches per forward (default 8)")
    ev.set_defaults(run=run_eval)


def build_config(args: argparse.Namespace):
    from ultragen.eval.config import EvalConfig, PatchLayout, parse_metrics

    return EvalConfig(
        images=args.images, out=args.out, metrics=parse_metrics(args.metrics, args.reference is not None),
        reference=args.reference, prompts=args.prompts, patch_px=args.patch_size,
        patch_layout=PatchLayout(args.patch_layout), patches_per_image=args.patches_per_image,
        fid_features=args.fid_features, is_splits=args.is_splits, inception_weights=args.inception_weights,
        clip_model=args.clip_model, seed=args.seed, device=args.device, batch_size=args.batch_size)


def check_out(out: Path, force: bool) -> None:
    from ultragen.pipeline.outputs import check_writable

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; pass a folder name for the report")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {str(out)!r} already exists; pass --force to replace it or choose another --out")
    check_writable(out.parent)


def run_eval(args: argparse.Namespace) -> int:
    config = build_config(args)
    check_out(config.out, args.force)
    from ultragen.eval.report import write_report
    from ultragen.eval.run import evaluate

    result = evaluate(config)
    write_report(result, config.out)
    print(json.dumps({name: round(entry["value"], 4) for name, entry in result.metrics["metrics"].items()}))
    print(f"wrote {config.out}/report.html and metrics.json ({result.metrics['seconds']:.1f} s)", file=sys.stderr)
    return 0
