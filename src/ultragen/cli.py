"""The ``ultragen`` command: parse, build the config, call the library. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import json
import sys

from ultragen.layout import GUIDE_OFFSET_HELP, InWindowOrder, make_layout
from ultragen.policy import POLICY_HELP, build_plan
from ultragen.summary import format_summary, plan_summary


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultragen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="dry run: grids, sequence, sparsity, FLOPs and memory of a size")
    plan.add_argument("--width", type=whole_number, required=True, help="image width in pixels (multiple of 16)")
    plan.add_argument("--height", type=whole_number, required=True, help="image height in pixels (multiple of 16)")
    plan.add_argument("--rho", type=whole_number, default=4, help="guide downscale per axis (default 4)")
    plan.add_argument("--window", type=whole_number, default=16, help="window side in tokens (default 16)")
    plan.add_argument("--text-len", type=whole_number, default=512, help="prompt tokens (FLUX.1-dev: 512)")
    plan.add_argument("--policy", default="default", help=POLICY_HELP + " (default: default)")
    plan.add_argument("--order", choices=[o.name.lower() for o in InWindowOrder], default="raster",
                      help="token order inside a window")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(run=run_plan)
    _add_bench_parser(commands)
    _add_generate_parser(commands)
    _add_decode_parser(commands)
    _add_testbed_parser(commands)
    from ultragen.train.commands import add_train_parser

    add_train_parser(commands)
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
    step = which.add_parser("step", help="seconds per transformer step and peak memory, dense vs hierarchical")
    step.add_argument("--sizes", nargs="+", type=whole_number, default=[1024, 2048, 4096, 8192], metavar="PX",
                      help="square sizes in pixels (default: 1024 2048 4096 8192)")
    step.add_argument("--backends", nargs="+", default=["flex", "triton", "triton-int8"],
                      help="hierarchical attention backends to measure")
    step.add_argument("--compile", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                      help="execution modes to measure (default: both)")
    step.add_argument("--precisions", nargs="+", choices=["bf16", "fp8"], default=["bf16", "fp8"],
                      help="linear-layer precisions to measure (default: both; fp8 needs torchao and sm89+)")
    step.add_argument("--no-dense", action="store_true", help="hierarchical only")
    step.add_argument("--ff-chunk-tokens", type=whole_number, nargs="+", default=[0], metavar="N",
                      help="hierarchical feed-forward chunk sizes to measure, each a variant: N tokens per chunk "
                           "(16384 is the pipeline's default), 0 unchunked (default: 0; e.g. 0 16384 for both)")
    step.add_argument("--guide-cache", nargs="+", choices=["on", "off"], default=["on"],
                      help="hierarchical step with the guide's keys and values cached (on, the pipeline's way) "
                           "and/or computed in every step (off) (default: on)")
    step.add_argument("--dense-compile-max-px", type=whole_number, default=8192,
                      help="skip the compiled dense step above this size (an 8K dense step takes ~90 s)")
    step.add_argument("--out", default=None, help="JSON path (default bench/results/step-<gpu>-<yyyymmdd>.json)")
    step.set_defaults(run=run_bench_step)
    image = which.add_parser("image", help="one whole 4096x4096 image, timed per stage")
    image.add_argument("--size", type=whole_number, default=4096, help="square size in pixels (default 4096)")
    image.add_argument("--backend", default="auto")
    image.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    image.add_argument("--fp8", action="store_true", help="FP8 linear layers (torchao)")
    image.add_argument("--offload-text-encoders", action="store_true",
                       help="move the text encoders to the CPU after encoding (the peak memory it saves)")
    image.add_argument("--out", default=None, help="JSON path (default bench/results/image-<gpu>-<yyyymmdd>.json)")
    image.set_defaults(run=run_bench_image)


def run_bench_step(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ultragen.bench.record import result_path, write_result
    from ultragen.bench.step import run_step_bench, speedups

    path = args.out or result_path("step")

    def save(rows) -> None:  # after every row: a run cut short still leaves its measurements
        write_result(path, {"rows": [asdict(r) for r in rows], "speedups": speedups(rows)})

    run_step_bench(args.sizes, args.backends, [mode == "compiled" for mode in args.compile],
                   precisions=args.precisions, dense=not args.no_dense,
                   dense_compile_max_px=args.dense_compile_max_px, on_row=save,
                   ff_chunk_tokens=[n or None for n in dict.fromkeys(args.ff_chunk_tokens)],
                   guide_cache=[c == "on" for c in dict.fromkeys(args.guide_cache)])
    print(f"wrote {path}")
    return 0


def run_bench_image(args: argparse.Namespace) -> int:
    from ultragen.bench.image import run_image_bench
    from ultragen.bench.record import result_path, write_result

    result = run_image_bench(args.size, args.backend, compile_blocks=args.compile, fp8=args.fp8,
                             offload_text_encoders=args.offload_text_encoders)
    print(f"wrote {write_result(args.out or result_path('image'), {'image': result})}")
    return 0


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


def _add_generate_parser(commands) -> None:
    gen = commands.add_parser("generate", help="prompt -> high-resolution PNG (guide, hierarchical pass, tiled decode)")
    gen.add_argument("--model", required=True, help="Hugging Face id, local diffusers folder, or tiny-random")
    gen.add_argument("--prompt", help="what to draw")
    gen.add_argument("--prompts-file", help="text file, one prompt per line ('#' comments); seeds count up")
    gen.add_argument("--width", type=whole_number, required=True, help="image width in pixels (multiple of 16)")
    gen.add_argument("--height", type=whole_number, required=True, help="image height in pixels (multiple of 16)")
    gen.add_argument("--seed", type=whole_number, default=0, help="seed of the first prompt (default 0)")
    gen.add_argument("--steps", type=whole_number, help="N, hires schedule length (dev: 28, schnell: 4)")
    gen.add_argument("--guide-steps", type=whole_number, help="stage-A steps (dev: 28, schnell: 4)")
    gen.add_argument("--warm-start-skip", type=whole_number, help="k, hires steps skipped (dev: 10, schnell: 1)")
    gen.add_argument("--guidance", type=float, help="hires guidance embedding (dev: 4.5)")
    gen.add_argument("--guide-guidance", type=float, help="stage-A guidance embedding (dev: 3.5)")
    gen.add_argument("--rho", type=whole_number, default=4, help="guide downscale per side (default 4)")
    gen.add_argument("--window", type=whole_number, default=16, help="window side in tokens (default 16)")
    gen.add_argument("--policy", default="default", help=POLICY_HELP + " (default: default)")
    gen.add_argument("--backend", default="auto", help="attention backend (default auto)")
    gen.add_argument("--shift", type=float, help="static shift of the hires schedule (default: the model's)")
    gen.add_argument("--sharpen", type=float, default=0.5, help="warm-start unsharp-mask strength (default 0.5)")
    gen.add_argument("--ntk", type=float, default=1.0, help="RoPE NTK factor of the hires pass (default 1)")
    gen.add_argument("--guide-offset-tokens", type=float, help=GUIDE_OFFSET_HELP)
    gen.add_argument("--cascade", type=whole_number, nargs="?", const=2, default=1, metavar="LEVELS",
                     help="chain LEVELS hierarchical passes, each output the next guide (flag alone: 2)")
    gen.add_argument("--lora", help="guide LoRA .safetensors written by ultragen train")
    gen.add_argument("--lora-force", action="store_true", help="use the LoRA even if its settings differ")
    gen.add_argument("--vae-tile", type=whole_number, help="VAE decode tile in pixels (default: the VAE's)")
    gen.add_argument("--offload-text-encoders", action="store_true", help="move text encoders to CPU after use")
    gen.add_argument("--no-guide-cache", action="store_true",
                     help="recompute the guide's keys/values every step instead of once per image: ~8 %% slower, "
                          "frees their memory (2.8 GB at 4K, ~11.5 GB at 8K)")
    gen.add_argument("--compile", action="store_true", help="torch.compile the hierarchical blocks (GPU)")
    gen.add_argument("--fp8", action="store_true", help="FP8 transformer blocks (GPU, compute capability 8.9+)")
    gen.add_argument("--ff-chunk-tokens", type=int, metavar="N", default=16384,
                     help="feed-forward over chunks of N tokens: less activation memory at 8K, and what lets --fp8 "
                          "run there on 80 GB without --compile; compiled blocks run it whole (default 16384; 0: off)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    gen.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float16, ...")
    gen.add_argument("--out", help="a .png file (one prompt) or a folder (default: the current folder)")
    gen.add_argument("--force", action="store_true", help="overwrite existing files")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    gen.add_argument("--dry-run", action="store_true", help="check everything, print the plan as JSON, load nothing")
    gen.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from ultragen.pipeline.config import GenerationConfig
    from ultragen.pipeline.job import describe, generate_files, prepare_generation

    config = GenerationConfig(
        height_px=args.height, width_px=args.width, model=args.model, seed=args.seed, steps=args.steps,
        guide_steps=args.guide_steps, warm_start_skip=args.warm_start_skip, guidance_scale=args.guidance,
        guide_guidance_scale=args.guide_guidance, rho=args.rho, window_tokens=args.window, policy=args.policy,
        backend=args.backend, shift=args.shift, sharpen_strength=args.sharpen, ntk_factor=args.ntk,
        guide_offset_tokens=args.guide_offset_tokens, cascade_levels=args.cascade, lora_path=args.lora,
        vae_tile_px=args.vae_tile, offload_text_encoders=args.offload_text_encoders, compile_blocks=args.compile,
        fp8=args.fp8, ff_chunk_tokens=args.ff_chunk_tokens or None, cache_guide=not args.no_guide_cache,
    )
    job = prepare_generation(config, args.prompt, args.prompts_file, args.out, force=args.force, device=args.device,
                             dtype=args.dtype, lora_allow_mismatch=args.lora_force)
    if args.dry_run:
        print(json.dumps(describe(job), indent=2))
        return 0
    generate_files(job, progress=not args.quiet, log=lambda line: print(line, file=sys.stderr))
    return 0


def _add_decode_parser(commands) -> None:
    dec = commands.add_parser("decode", help="decode a latent saved by generate (e.g. after running out of memory)")
    dec.add_argument("latent_file", help="NAME.latent.safetensors written by ultragen generate")
    dec.add_argument("--tile-size", type=whole_number, help="VAE tile in pixels (smaller: less memory), e.g. 512")
    dec.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    dec.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, ...")
    dec.add_argument("--model", help="take the VAE from this model instead of the one recorded in the file")
    dec.add_argument("--out", help="PNG to write (default: NAME.png next to the latent)")
    dec.add_argument("--force", action="store_true", help="overwrite an existing PNG")
    dec.add_argument("--quiet", action="store_true", help="no progress bar")
    dec.set_defaults(run=run_decode)


def run_decode(args: argparse.Namespace) -> int:
    from ultragen.pipeline.job import decode_file

    path = decode_file(args.latent_file, out=args.out, tile_px=args.tile_size, device=args.device, dtype=args.dtype,
                       model=args.model, force=args.force, progress=not args.quiet)
    print(f"wrote {path}", file=sys.stderr)
    return 0


# ultragen.testbed.sample.Strategy's values, spelt out so that building the parser does not import diffusers
TESTBED_STRATEGIES = ("dense", "windows", "windows+guide", "windows+guide+lora")


def _add_testbed_parser(commands) -> None:
    tb = commands.add_parser("testbed", help="the quality testbed: a small FLUX model trained on procedural scenes")
    which = tb.add_subparsers(dest="testbed", required=True)
    data = which.add_parser("data", help="write procedural scenes: PNGs, NAME.txt captions, scenes.jsonl")
    data.add_argument("--out", required=True, help="folder to write")
    data.add_argument("--count", type=whole_number, default=16, help="number of scenes (default 16)")
    data.add_argument("--first-seed", type=whole_number, default=0, help="seed of the first scene (default 0)")
    data.add_argument("--size", type=whole_number, default=128, help="image side in pixels (default 128)")
    data.add_argument("--scales", type=whole_number, nargs="+", default=[1], help="also write these multiples")
    data.add_argument("--force", action="store_true", help="overwrite an existing scene set")
    data.set_defaults(run=run_testbed_data)
    train = which.add_parser("train", help="train (or resume) the testbed model with flow matching")
    train.add_argument("--run-dir", required=True, help="run folder (resumed when it holds a checkpoint)")
    train.add_argument("--preset", default="base", help="testbed config: base (GPU) or cpu-tiny")
    train.add_argument("--steps", type=whole_number, default=20000, help="total optimiser steps (default 20000)")
    train.add_argument("--batch-size", type=whole_number, default=64, help="scenes per step (default 64)")
    train.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    train.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights used to sample")
    train.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this long; rerun to resume")
    train.add_argument("--workers", type=int, default=0, help="scene-rendering processes (default 0)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=run_testbed_train)
    ev = which.add_parser("eval", help="score every high-resolution strategy at 4x against the base resolution")
    ev.add_argument("--run-dir", required=True, help="run folder of `ultragen testbed train`")
    ev.add_argument("--prompts", type=whole_number, default=32, help="evaluation scenes (default 32)")
    ev.add_argument("--steps", type=whole_number, default=20, help="sampling steps N (default 20)")
    ev.add_argument("--warm-start-skip", type=int, default=7, help="k of N steps skipped by warm start (default 7)")
    ev.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    ev.add_argument("--policy", default="default", help=POLICY_HELP + " (default: default)")
    ev.add_argument("--guide-offset-tokens", type=float, help=GUIDE_OFFSET_HELP)
    ev.add_argument("--lora", help="guide LoRA for the windows+guide+lora rows")
    ev.add_argument("--strategies", nargs="+", choices=TESTBED_STRATEGIES, default=list(TESTBED_STRATEGIES),
                    help="strategies to run, each with and without warm start (default: all)")
    ev.add_argument("--batch-size", type=whole_number, default=4, help="prompts per batch (default 4)")
    ev.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ev.add_argument("--out", help="results JSON (default bench/results/testbed-<yyyymmdd>.json)")
    ev.add_argument("--grid", help="sample grid PNG (default: next to the JSON)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(run=run_testbed_eval)
    cache = which.add_parser("lora-cache", help="a guide-LoRA cache of testbed scenes for `ultragen train`")
    cache.add_argument("--run-dir", required=True, help="run folder of `ultragen testbed train`")
    cache.add_argument("--out", required=True, help="new cache folder")
    cache.add_argument("--count", type=whole_number, default=2048, help="scenes (default 2048)")
    cache.add_argument("--workers", type=whole_number, default=0,
                       help="processes that render scenes (default 0: in this process)")
    cache.set_defaults(run=run_testbed_lora_cache)


def run_testbed_lora_cache(args: argparse.Namespace) -> int:
    from ultragen.testbed.lora_data import write_lora_cache

    for written in write_lora_cache(args.run_dir, args.out, args.count, workers=args.workers):
        print(f"\r{written}/{args.count} scenes", end="", file=sys.stderr)
    print(f"\nwrote {args.out}; next: ultragen train --model {args.run_dir}/model --cache {args.out} --out RUN",
          file=sys.stderr)
    return 0


def run_testbed_data(args: argparse.Namespace) -> int:
    from ultragen.testbed.data import write_scenes

    seeds = range(args.first_seed, args.first_seed + args.count)
    paths = list(write_scenes(args.out, seeds, args.size, tuple(args.scales), force=args.force))
    print(f"wrote {len(paths)} scenes to {args.out}", file=sys.stderr)
    return 0


def run_testbed_train(args: argparse.Namespace) -> int:
    from ultragen.testbed.model import get_config
    from ultragen.testbed.train import TrainSettings, train

    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                             workers=args.workers)
    step = train(get_config(args.preset), settings, args.run_dir, device=args.device, progress=not args.quiet,
                 max_minutes=args.max_minutes, log=lambda line: print(line, file=sys.stderr))
    print(f"{args.run_dir}: step {step} of {args.steps}", file=sys.stderr)
    return 0


def run_testbed_eval(args: argparse.Namespace) -> int:
    import datetime
    from pathlib import Path

    from ultragen.testbed.evaluate import EvalSettings, evaluate, write_results
    from ultragen.testbed.sample import SamplerSettings

    sampler = SamplerSettings(steps=args.steps, warm_start_skip=args.warm_start_skip, cfg_scale=args.cfg,
                              policy=args.policy, guide_offset_tokens=args.guide_offset_tokens)
    settings = EvalSettings(prompts=args.prompts, batch_size=args.batch_size, lora_path=args.lora, sampler=sampler,
                            strategies=tuple(args.strategies))
    out = Path(args.out or f"bench/results/testbed-{datetime.date.today():%Y%m%d}.json")
    record, images = evaluate(args.run_dir, settings, device=args.device, progress=not args.quiet)
    write_results(record, images, out, args.grid or out.with_suffix(".png"), settings.grid_prompts)
    print(json.dumps({"base": record["base"], "rows": record["rows"]}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
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
