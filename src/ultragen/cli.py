"""The ``ultragen`` command: parse, build the config, call the library. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import json
import sys

from ultragen.layout import InWindowOrder, make_layout
from ultragen.policy import PRESETS, build_plan
from ultragen.summary import format_summary, plan_summary


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultragen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="dry run: grids, sequence, sparsity, FLOPs and memory of a size")
    plan.add_argument("--width", type=_positive_int, required=True, help="image width in pixels (multiple of 16)")
    plan.add_argument("--height", type=_positive_int, required=True, help="image height in pixels (multiple of 16)")
    plan.add_argument("--rho", type=_positive_int, default=4, help="guide downscale per axis (default 4)")
    plan.add_argument("--window", type=_positive_int, default=16, help="window side in tokens (default 16)")
    plan.add_argument("--text-len", type=_positive_int, default=512, help="prompt tokens (FLUX.1-dev: 512)")
    plan.add_argument("--policy", default="default", help=f"attention policy preset: {', '.join(sorted(PRESETS))}")
    plan.add_argument("--order", choices=[o.name.lower() for o in InWindowOrder], default="raster",
                      help="token order inside a window")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(run=run_plan)
    _add_bench_parser(commands)
    return parser


def _add_bench_parser(commands) -> None:
    from ultragen.bench.attention import SIZES

    bench = commands.add_parser("bench", help="benchmarks on the GPU (not tests)")
    which = bench.add_subparsers(dest="bench", required=True)
    attention = which.add_parser("attention", help="dense cuDNN/FA2 SDPA vs the block-sparse backends, FLUX shapes")
    attention.add_argument("--sizes", nargs="+", default=list(SIZES), metavar="WxH",
                           help=f"sizes in pixels, width x height (default: {' '.join(SIZES)})")
    attention.add_argument("--out", default=None,
                           help="JSON path (default bench/results/attention-<gpu>-<yyyymmdd>.json)")
    attention.set_defaults(run=run_bench_attention)


def run_plan(args: argparse.Namespace) -> int:
    layout = make_layout(args.height, args.width, window_tokens=args.window, rho=args.rho,
                         text_tokens=args.text_len, in_window_order=args.order)
    summary = plan_summary(build_plan(layout, args.policy))
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def run_bench_attention(args: argparse.Namespace) -> int:
    import torch

    from ultragen.bench import attention

    if not torch.cuda.is_available():
        raise ValueError("the attention benchmark needs a CUDA GPU; run it on the GPU machine")
    for size in args.sizes:
        attention.parse_size(size)
    rows = attention.run(args.sizes)
    print(attention.format_table(rows))
    print(f"wrote {attention.write_results(rows, args.out or attention.results_path())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"ultragen {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
