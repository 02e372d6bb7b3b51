"""The ``ultragen`` command: parse, build the config, call the library. Bad input exits 2 with one line.

Each subcommand is registered by an ``add_parser(commands)`` function (this module's, or a subcommand module's such
as :func:`ultragen.train.commands.add_parser`) that calls ``commands.add_parser(name, help=...,
add_arguments=fn)``: ``fn(parser)`` adds the options when that subcommand is used or its help is shown, and the
handler imports what it needs. So ``ultragen --help`` imports neither torch nor diffusers, and ``ultragen plan``
imports torch but not diffusers or peft.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def step_cache_setting(text: str) -> str:
    """``--cache``: off, fbcache or fbcache:THRESHOLD (``ultragen.step_cache``), checked while parsing."""
    from ultragen.step_cache import parse_cache

    try:
        return str(parse_cache(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


CACHE_HELP = ("step cache of the hires pass: off, fbcache or fbcache:THRESHOLD (First-Block-Cache: a step whose "
              "first block changes less than THRESHOLD, relative L1, reuses the other blocks' last residual; "
              "fbcache alone: 0.08). Default off until the testbed eval has measured its quality cost")


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose options are added on first use, and whose errors are one line, not the usage."""

    def __init__(self, *args, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def populate(self) -> None:
        """Add the options now (once): before parsing, and before printing help or usage."""
        if self._add_arguments is not None:
            add, self._add_arguments = self._add_arguments, None
            add(self)
            self.set_defaults(command_prog=self.prog)

    def parse_known_args(self, args=None, namespace=None):
        self.populate()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.populate()
        return super().format_help()

    def format_usage(self) -> str:
        self.populate()
        return super().format_usage()

    def parse_args(self, args=None, namespace=None):
        args, extras = self.parse_known_args(args, namespace)
        if extras:  # named by the subcommand they were given to, not by the top level
            prog = getattr(args, "command_prog", self.prog)
            self.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extras)}; see `{prog} --help`\n")
        return args

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; cheap (no options are added until a subcommand is used)."""
    from ultragen.eval.commands import add_eval_parser
    from ultragen.train.commands import add_parser as add_train_parser
    from ultragen.web.commands import add_serve_parser

    parser = CommandParser(prog="ultragen", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (_add_plan_parser, _add_bench_parser, _add_generate_parser, _add_decode_parser,
                       _add_testbed_parser, add_train_parser, add_eval_parser, add_serve_parser):
        add_parser(commands)
    return parser


def _add_plan_parser(commands) -> None:
    commands.add_parser("plan", help="dry run: grids, sequence, sparsity, FLOPs and memory of a size",
                        add_arguments=_plan_arguments)


def _plan_arguments(plan: argparse.ArgumentParser) -> None:
    from ultragen.layout import InWindowOrder
    from ultragen.policy import POLICY_HELP

    plan.add_argument("--width", type=whole_number, required=True, help="image width in pixels (multiple of 16)")
    plan.add_argument("--height", type=whole_number, required=True, help="image height in pixels (multiple of 16)")
    plan.add_argument("--rho", type=whole_number, default=4, help="guide downscale per axis (default 4)")
    plan.add_argument("--window", type=whole_number, default=16, help="window side in tokens (default 16)")
    plan.add_argument("--block-tokens", type=whole_number, default=128, help="attention block size (default 128)")
    plan.add_argument("--text-len", type=whole_number, default=512, help="prompt tokens (FLUX.1-dev: 512)")
    plan.add_argument("--policy", default="default", help=POLICY_HELP + " (default: default)")
    plan.add_argument("--order", choices=[o.name.lower() for o in InWindowOrder], default="raster",
                      help="token order inside a window")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(run=run_plan)


def _add_bench_parser(commands) -> None:
    commands.add_parser("bench", help="benchmarks on the GPU (not tests)", add_arguments=_bench_arguments)


def _bench_arguments(bench: argparse.ArgumentParser) -> None:
    from ultragen.bench.attention import SIZES

    which = bench.add_subparsers(dest="bench", required=True)
    attention = which.add_parser("attention", help="dense cuDNN/FA2 SDPA vs the block-sparse backends, FLUX shapes")
    attention.add_argument("--sizes", nargs="+", default=list(SIZES), metavar="WxH",
                           help=f"sizes in pixels, width x height (default: {' '.join(SIZES)})")
    attention.add_argument("--out", default=None,
                           help="JSON path (default bench/results/attention-<gpu>-<yyyymmdd>.json)")
    attention.set_defaults(run=run_bench_attention)
    step = which.add_parser("step", help="seconds per transformer step and peak memory, dense vs hierarchical")
    step.add_argument("--family", default="flux1", help="model family: flux1 (default) or flux2 (FLUX.2 [klein])")
    step.add_argument("--config", default=None,
                      help="architecture (random weights): flux1: dev (default); flux2: klein-4b (default), klein-9b")
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
    step.add_argument("--out", default=None,
                      help="JSON path (default bench/results/step-<config>-<gpu>-<yyyymmdd>.json)")
    step.add_argument("--parallel", nargs="+", choices=["ulysses", "halo"],
                      help="under `torchrun --nproc-per-node N`: the hierarchical step sharded over the N GPUs in these "
                           "modes, against one GPU (speedup, scaling efficiency, communication time and bytes per "
                           "step); default file bench/results/step-parallel-<N>gpu-<gpu>-<yyyymmdd>.json")
    step.set_defaults(run=run_bench_step)
    image = which.add_parser("image", help="one whole 4096x4096 image, timed per stage")
    image.add_argument("--family", default="flux1", help="model family: flux1 (default) or flux2 (FLUX.2 [klein])")
    image.add_argument("--config", default=None,
                       help="architecture (random weights, every component at its real size): flux1: dev (default; "
                            "28 guide + 18 hires steps); flux2: klein-4b (default), klein-9b (4 + 4 distilled steps)")
    image.add_argument("--size", type=whole_number, default=4096, help="square size in pixels (default 4096)")
    image.add_argument("--backend", default="auto")
    image.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    image.add_argument("--fp8", action="store_true", help="FP8 linear layers (torchao)")
    image.add_argument("--cache", type=step_cache_setting, default="off", metavar="NAME[:THRESHOLD]", help=CACHE_HELP)
    image.add_argument("--offload-text-encoders", action="store_true",
                       help="move the text encoders to the CPU after encoding (the peak memory it saves)")
    image.add_argument("--style-lora-rank", type=whole_number, metavar="R",
                       help="then again with a random rank-R style LoRA on every block linear (unfused): its time "
                            "and peak memory against none, in the same JSON")
    image.add_argument("--fuse-style-lora", action="store_true",
                       help="with --style-lora-rank: that LoRA fused into the weights (before --fp8 quantizes them)")
    image.add_argument("--out", default=None, help="JSON path (default bench/results/image-<gpu>-<yyyymmdd>.json; "
                                                   "other than FLUX.1-dev: image-<config>-<gpu>-<yyyymmdd>.json)")
    image.set_defaults(run=run_bench_image)


def run_bench_step(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    if args.parallel:
        from ultragen.parallel.bench import run_bench_step_parallel

        return run_bench_step_parallel(args)

    from ultragen.bench import step as bench_step
    from ultragen.bench.models import bench_config
    from ultragen.bench.record import result_path, write_result

    name, architecture = bench_config(args.family, args.config)
    path = args.out or result_path(f"step-{name}")
    model = {"family": args.family, "config": name}

    def save(rows) -> None:  # after every row: a run cut short still leaves its measurements
        write_result(path, {"model": model, "rows": [asdict(r) for r in rows], "speedups": bench_step.speedups(rows)})

    bench_step.run_step_bench(args.sizes, args.backends, [mode == "compiled" for mode in args.compile],
                   precisions=args.precisions, dense=not args.no_dense,
                   dense_compile_max_px=args.dense_compile_max_px, on_row=save,
                   ff_chunk_tokens=[n or None for n in dict.fromkeys(args.ff_chunk_tokens)],
                   guide_cache=[c == "on" for c in dict.fromkeys(args.guide_cache)], family=args.family,
                   config=architecture)
    print(f"wrote {path}")
    return 0


def run_bench_image(args: argparse.Namespace) -> int:
    from ultragen.bench.image import run_image_bench
    from ultragen.bench.models import bench_config
    from ultragen.bench.record import result_path, write_result

    name, _ = bench_config(args.family, args.config)  # a bad --family / --config: exit 2 before anything is built
    result = run_image_bench(args.size, args.backend, compile_blocks=args.compile, fp8=args.fp8,
                             offload_text_encoders=args.offload_text_encoders, style_lora_rank=args.style_lora_rank,
                             step_cache=args.cache, family=args.family, config=name,
                             **({"fuse_style_lora": True} if args.fuse_style_lora else {}))
    path = args.out or result_path("image" if (args.family, name) == ("flux1", "dev") else f"image-{name}")
    print(f"wrote {write_result(path, {'image': result})}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from ultragen.layout import make_layout
    from ultragen.policy import build_plan
    from ultragen.summary import format_summary, plan_summary

    layout = make_layout(args.height, args.width, window_tokens=args.window, rho=args.rho,
                         block_tokens=args.block_tokens, text_tokens=args.text_len, in_window_order=args.order)
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
    commands.add_parser("generate", help="prompt -> high-resolution PNG (guide, hierarchical pass, tiled decode)",
                        add_arguments=_generate_arguments)


def _generate_arguments(gen: argparse.ArgumentParser) -> None:
    from ultragen.layout import GUIDE_OFFSET_HELP
    from ultragen.policy import POLICY_HELP

    gen.add_argument("--model", required=True,
                     help="Hugging Face id or local diffusers folder of a FLUX.1 or FLUX.2 [klein] model (family read "
                          "from its model_index.json), or tiny-random / tiny-random-klein / tiny-random-klein-base")
    gen.add_argument("--prompt", help="what to draw")
    gen.add_argument("--prompts-file", help="text file, one prompt per line ('#' comments); seeds count up")
    gen.add_argument("--width", type=whole_number, required=True, help="image width in pixels (multiple of 16)")
    gen.add_argument("--height", type=whole_number, required=True, help="image height in pixels (multiple of 16)")
    gen.add_argument("--seed", type=whole_number, default=0, help="seed of the first prompt (default 0)")
    gen.add_argument("--steps", type=whole_number,
                     help="N, hires schedule length (dev: 28, schnell: 4, klein: 4, klein-base: 28)")
    gen.add_argument("--guide-steps", type=whole_number,
                     help="stage-A steps (dev: 28, schnell: 4, klein: 4, klein-base: 50)")
    gen.add_argument("--warm-start-skip", type=whole_number,
                     help="k, hires steps skipped by the warm start (dev: 10, schnell: 1; klein: 0, i.e. off, the "
                          "hires stage starts from noise: the authors switch warm start off for klein, and of 4 "
                          "distilled steps a skipped one is a quarter of the schedule)")
    gen.add_argument("--guidance", type=float, help="hires guidance embedding (dev: 4.5)")
    gen.add_argument("--guide-guidance", type=float, help="stage-A guidance embedding (dev: 3.5)")
    gen.add_argument("--cfg", type=float, metavar="SCALE",
                     help="classifier-free guidance scale of the hires pass, FLUX.2 klein-base models only (default 4; "
                          "both branches through the hierarchical transformer, sharing the cached guide)")
    gen.add_argument("--guide-cfg", type=float, metavar="SCALE", help="the same for stage A (klein-base: 4)")
    gen.add_argument("--negative-prompt", default="", help="what CFG steers away from (klein-base; default empty)")
    gen.add_argument("--rho", type=whole_number, help="guide downscale per side (default: the LoRA's, else 4)")
    gen.add_argument("--window", type=whole_number, help="window side in tokens (default: the LoRA's, else 16)")
    gen.add_argument("--block-tokens", type=whole_number,
                     help="attention block size in tokens (default: the LoRA's, else 128)")
    gen.add_argument("--policy", help=POLICY_HELP + " (default: the LoRA's, else default)")
    gen.add_argument("--backend", default="auto", help="attention backend (default auto)")
    gen.add_argument("--shift", type=float,
                     help="static shift of the hires schedule (default: the model's; klein: its resolution-dependent "
                          "shift)")
    gen.add_argument("--sharpen", type=float, default=0.5, help="warm-start unsharp-mask strength (default 0.5)")
    gen.add_argument("--ntk", type=float, help="RoPE NTK factor of the hires pass (default: the LoRA's, else 1)")
    gen.add_argument("--guide-offset-tokens", type=float, help=GUIDE_OFFSET_HELP + " (default: the LoRA's)")
    gen.add_argument("--cascade", type=whole_number, nargs="?", const=2, default=1, metavar="LEVELS",
                     help="chain LEVELS hierarchical passes, each output the next guide (flag alone: 2)")
    gen.add_argument("--lora", help="guide LoRA .safetensors written by ultragen train; the settings it was trained "
                                    "under (--rho, --window, --block-tokens, --policy, --ntk, --guide-offset-tokens) "
                                    "are the defaults")
    gen.add_argument("--lora-force", action="store_true",
                     help="use the LoRA even if settings given here differ from its own (says which)")
    gen.add_argument("--style-lora", action="append", default=[], metavar="FILE[:SCALE]",
                     help="a FLUX LoRA of your own (.safetensors: diffusers/PEFT, kohya, XLabs formats) at SCALE "
                          "(default 1), on every token in both stages as in diffusers; repeat for several")
    gen.add_argument("--fuse-style-loras", action="store_true",
                     help="merge the --style-lora files into the weights once (before --fp8 quantizes them): no "
                          "extra work per step; the record says they were fused")
    gen.add_argument("--vae-tile", type=whole_number, help="VAE decode tile in pixels (default: the VAE's)")
    gen.add_argument("--offload-text-encoders", action="store_true", help="move text encoders to CPU after use")
    gen.add_argument("--no-guide-cache", action="store_true",
                     help="recompute the guide's keys/values every step instead of once per image: ~8 %% slower, "
                          "frees their memory (2.8 GB at 4K, ~11.5 GB at 8K)")
    gen.add_argument("--cache", type=step_cache_setting, default="off", metavar="NAME[:THRESHOLD]", help=CACHE_HELP)
    gen.add_argument("--compile", action="store_true", help="torch.compile the hierarchical blocks (GPU)")
    gen.add_argument("--fp8", action="store_true", help="FP8 transformer blocks (GPU, compute capability 8.9+)")
    gen.add_argument("--ff-chunk-tokens", type=int, metavar="N", default=16384,
                     help="feed-forward over chunks of N tokens: less activation memory at 8K, and what lets --fp8 "
                          "run there on 80 GB without --compile; compiled blocks run it whole (default 16384; 0: off)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    gen.add_argument("--parallel", choices=["ulysses", "halo"],
                     help="split the hires pass over the processes of `torchrun --nproc-per-node N -m ultragen.cli "
                          "generate ...` (one GPU each): ulysses (all-to-all over heads) or halo (neighbour windows "
                          "only, less traffic); rank 0 writes the files")
    gen.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float16, ...")
    gen.add_argument("--out", help="a .png file (one prompt) or a folder (default: the current folder)")
    gen.add_argument("--force", action="store_true", help="overwrite existing files")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    gen.add_argument("--dry-run", action="store_true", help="check everything, print the plan as JSON, load nothing")
    gen.set_defaults(run=run_generate)


# generate's options that a guide LoRA fixes: option dest -> GenerationConfig field
LORA_OPTIONS = {"rho": "rho", "window": "window_tokens", "block_tokens": "block_tokens", "policy": "policy",
                "ntk": "ntk_factor", "guide_offset_tokens": "guide_offset_tokens"}


def run_generate(args: argparse.Namespace) -> int:
    from dataclasses import fields
    from pathlib import Path

    from ultragen.pipeline.config import GenerationConfig
    from ultragen.pipeline.job import describe, generate_files, lora_settings, prepare_generation

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    if args.parallel:
        from ultragen.parallel.launch import quiet_other_ranks

        quiet_other_ranks()  # the user reads rank 0; a rank's own failure still prints its line

    given = {field: getattr(args, dest) for dest, field in LORA_OPTIONS.items() if getattr(args, dest) is not None}
    if args.lora is not None and Path(args.lora).is_file():  # a missing file is refused by GenerationConfig
        from_lora = {k: v for k, v in lora_settings(args.lora).items() if k not in given}
        defaults = {f.name: f.default for f in fields(GenerationConfig)}
        if changed := {k: v for k, v in from_lora.items() if v != defaults[k]}:
            log(f"settings from the LoRA: {', '.join(f'{k}={v}' for k, v in changed.items())}")
        given = from_lora | given
    config = GenerationConfig(
        height_px=args.height, width_px=args.width, model=args.model, seed=args.seed, steps=args.steps,
        guide_steps=args.guide_steps, warm_start_skip=args.warm_start_skip, guidance_scale=args.guidance,
        guide_guidance_scale=args.guide_guidance, true_cfg_scale=args.cfg, guide_true_cfg_scale=args.guide_cfg,
        negative_prompt=args.negative_prompt, backend=args.backend, shift=args.shift,
        sharpen_strength=args.sharpen, cascade_levels=args.cascade, lora_path=args.lora, vae_tile_px=args.vae_tile,
        offload_text_encoders=args.offload_text_encoders, compile_blocks=args.compile, fp8=args.fp8,
        ff_chunk_tokens=args.ff_chunk_tokens or None, cache_guide=not args.no_guide_cache, step_cache=args.cache,
        **given,
    )
    from ultragen.style_lora import parse_style_lora

    style_loras = tuple(parse_style_lora(value) for value in args.style_lora)
    job = prepare_generation(config, args.prompt, args.prompts_file, args.out, force=args.force, device=args.device,
                             dtype=args.dtype, lora_allow_mismatch=args.lora_force, log=log, style_loras=style_loras,
                             fuse_style_loras=args.fuse_style_loras)
    if args.dry_run:
        print(json.dumps(describe(job), indent=2))
        return 0
    if args.parallel:
        from ultragen.parallel.launch import generate_files_parallel

        return generate_files_parallel(job, args.parallel, progress=not args.quiet, log=log)
    generate_files(job, progress=not args.quiet, log=log)
    return 0


def _add_decode_parser(commands) -> None:
    commands.add_parser("decode", help="decode a latent saved by generate (e.g. after running out of memory)",
                        add_arguments=_decode_arguments)


def _decode_arguments(dec: argparse.ArgumentParser) -> None:
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
    commands.add_parser("testbed", help="the quality testbed: a small FLUX model trained on procedural scenes",
                        add_arguments=_testbed_arguments)


def _testbed_arguments(tb: argparse.ArgumentParser) -> None:
    from ultragen.layout import GUIDE_OFFSET_HELP
    from ultragen.policy import POLICY_HELP

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
    ev.add_argument("--cache", nargs="+", type=step_cache_setting, default=["off"], metavar="CACHE",
                    help="step cache settings (off, fbcache, fbcache:THRESHOLD); each but off adds a row of "
                         "windows+guide+lora +warm sampled with it, with its PSNR against the uncached row "
                         "(default: off)")
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
                            strategies=tuple(args.strategies), caches=tuple(args.cache))
    out = Path(args.out or f"bench/results/testbed-{datetime.date.today():%Y%m%d}.json")
    record, images = evaluate(args.run_dir, settings, device=args.device, progress=not args.quiet)
    write_results(record, images, out, args.grid or out.with_suffix(".png"), settings.grid_prompts)
    print(json.dumps({"base": record["base"], "rows": record["rows"]}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


# notices of libraries that a user can neither act on nor silence: (logger, text the record contains)
QUIET_NOTICES = (
    # transformers, when diffusers' FluxPipeline module imports CLIP/Siglip image processors (used only for
    # IP-adapters, never by ultragen) without torchvision installed: the PIL fallback it announces is fine
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
)


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_library_notices() -> None:
    """Drop the :data:`QUIET_NOTICES` (once per process; the command's own warnings stay)."""
    for name, text in QUIET_NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.text == text for f in logger.filters):
            logger.addFilter(_DropNotice(text))


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a malformed command line (2, one line from CommandParser.error)
        return done.code
    quiet_library_notices()
    prog = getattr(args, "command_prog", f"ultragen {args.command}")
    try:
        return args.run(args)
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written under temporary names and renamed: none is left half-written
        print(f"\n{prog}: interrupted; no file was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
