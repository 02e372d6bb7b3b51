"""The ``ultragen train`` and ``ultragen train prepare`` subcommands: flags -> config -> library call.

Registered by ``ultragen.cli.build_parser`` through :func:`add_parser`; the options are added (and peft imported)
only when ``ultragen train`` is used. Bad input raises ValueError, which the CLI prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ultragen.cli import whole_number


def add_parser(commands) -> None:
    commands.add_parser(
        "train", help="train the guide LoRA (first: ultragen train prepare)",
        description="ultragen train --model ID --cache CACHE --out RUN_DIR [options]; build CACHE first with "
                    "ultragen train prepare. Several GPUs: accelerate launch -m ultragen.cli train ...",
        add_arguments=_train_arguments)


def _train_arguments(train: argparse.ArgumentParser) -> None:
    from ultragen.flux.lora import LoraTargets
    from ultragen.layout import GUIDE_OFFSET_HELP
    from ultragen.policy import POLICY_HELP
    from ultragen.train.config import LrSchedule, Optimizer

    train.add_argument("--model", help="Hugging Face id, local diffusers folder, or tiny-random (as in prepare)")
    train.add_argument("--cache", help="folder written by ultragen train prepare")
    train.add_argument("--out", help="run folder: checkpoints, loss.jsonl, guide_lora.safetensors")
    train.add_argument("--steps", type=whole_number, default=1000, help="optimizer steps (default 1000; paper 20000)")
    train.add_argument("--lr", type=float, help="learning rate (default 1e-4 AdamW, 1.0 Prodigy)")
    train.add_argument("--lr-schedule", choices=[s.value for s in LrSchedule], default="constant")
    train.add_argument("--warmup-steps", type=whole_number, default=0, help="linear warmup steps (default 0)")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--rank", type=whole_number, default=16, help="LoRA rank (default 16)")
    train.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    train.add_argument("--targets", choices=[t.value for t in LoraTargets],
                       help="wide (default; --resume: the run's own): attention q/k/v, output, feed-forward, "
                            "embedder; qkv: attention q/k/v only (the paper's choice; lower quality on the testbed, "
                            "docs/design.md)")
    train.add_argument("--optimizer", choices=[o.value for o in Optimizer], default="adamw")
    train.add_argument("--batch-size", type=whole_number, default=1, help="images per process per micro-step (default 1)")
    train.add_argument("--grad-accum", type=whole_number, default=1, help="micro-steps per optimizer step (authors: 8)")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in the backward")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off; authors 0.1)")
    train.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions (default 0.1)")
    train.add_argument("--policy", default="default", help=POLICY_HELP + " (default: default)")
    train.add_argument("--ntk-factor", type=float, default=1.0, help="RoPE NTK factor (default 1)")
    train.add_argument("--guide-offset-tokens", type=float, help=GUIDE_OFFSET_HELP)
    train.add_argument("--window", type=whole_number, help="window side in tokens (default: the cache's)")
    train.add_argument("--block-tokens", type=whole_number, help="attention block size (default: the cache's)")
    train.add_argument("--size", type=whole_number, help="check: the cache's training size in pixels")
    train.add_argument("--rho", type=whole_number, help="check: the cache's guide downscale")
    train.add_argument("--val-items", type=whole_number, help="cached items held out for the validation loss")
    train.add_argument("--save-every", type=whole_number, default=500, help="checkpoint every N steps (default 500)")
    train.add_argument("--validate-every", type=whole_number, default=250, help="validation every N steps (default 250)")
    train.add_argument("--validate-prompts", help="text file of prompts to sample at each validation")
    train.add_argument("--seed", type=whole_number, default=0)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=run_train)
    actions = train.add_subparsers(dest="train_action", required=False, metavar="prepare")
    actions.add_parser("prepare", help="images + captions -> latent and text-embedding cache",
                       add_arguments=_prepare_arguments)


def _prepare_arguments(prep: argparse.ArgumentParser) -> None:
    prep.add_argument("--model", required=True, help="Hugging Face id, local diffusers folder, or tiny-random")
    prep.add_argument("--images", help="folder of images (recursive) with NAME.txt captions")
    prep.add_argument("--captions", help="JSONL captions instead of sidecars: {\"file\": ..., \"caption\": ...}")
    prep.add_argument("--out", required=True, help="new (or empty) folder for the cache")
    prep.add_argument("--size", type=whole_number, default=1024, help="square training size in pixels (default 1024)")
    prep.add_argument("--rho", type=whole_number, default=4, help="guide downscale per side (default 4)")
    prep.add_argument("--window", type=whole_number, default=16, help="window side in tokens (default 16)")
    prep.add_argument("--block-tokens", type=whole_number, default=128, help="attention block size (default 128)")
    prep.add_argument("--text-tokens", type=whole_number, help="prompt tokens (default 512 dev, 256 schnell)")
    prep.add_argument("--batch-size", type=whole_number, default=4, help="images per encoder batch (default 4)")
    prep.add_argument("--generate", type=whole_number, default=0, metavar="N",
                      help="first generate N training images with the base model (needs --prompts)")
    prep.add_argument("--prompts", help="text file, one prompt a line, for --generate")
    prep.add_argument("--generate-steps", type=whole_number, help="sampling steps of --generate (default 28 dev, 4 schnell)")
    prep.add_argument("--seed", type=whole_number, default=0, help="seed of the first generated image (default 0)")
    prep.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present)")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(run=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from ultragen.train.config import PrepareConfig
    from ultragen.train.prepare import prepare_cache

    config = PrepareConfig(
        model=args.model, out_dir=args.out, images_dir=args.images, captions_file=args.captions, size_px=args.size,
        rho=args.rho, window_tokens=args.window, block_tokens=args.block_tokens, text_tokens=args.text_tokens,
        batch_size=args.batch_size, generate_count=args.generate, prompts_file=args.prompts,
        generate_steps=args.generate_steps, seed=args.seed,
    )
    prepare_cache(config, device=args.device, progress=not args.quiet,
                  log_line=lambda line: print(line, file=sys.stderr))
    return 0


def _targets(args: argparse.Namespace):
    """--targets, else the resumed run's own (runs started before wide became the default are q/k/v), else wide."""
    from ultragen.flux.lora import LoraTargets
    from ultragen.train.rundir import read_run_config

    if args.targets is not None:
        return LoraTargets(args.targets)
    saved = read_run_config(Path(args.out)) if args.resume and args.out else None
    return saved.targets if saved is not None else LoraTargets.WIDE


def train_config_from_args(args: argparse.Namespace):
    from ultragen.train.config import TrainConfig

    return TrainConfig(
        model=args.model, cache_dir=args.cache, out_dir=args.out, steps=args.steps, lr=args.lr,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, rank=args.rank,
        alpha=args.alpha, targets=_targets(args), optimizer=args.optimizer, batch_size=args.batch_size,
        grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing,
        max_grad_norm=args.max_grad_norm, caption_dropout=args.caption_dropout, policy=args.policy,
        ntk_factor=args.ntk_factor, guide_offset_tokens=args.guide_offset_tokens, window_tokens=args.window,
        block_tokens=args.block_tokens, size_px=args.size,
        rho=args.rho, val_items=args.val_items, save_every=args.save_every, validate_every=args.validate_every,
        validate_prompts=args.validate_prompts, seed=args.seed, resume=args.resume,
    )


def run_train(args: argparse.Namespace) -> int:
    from ultragen.train.loop import train

    config = train_config_from_args(args)
    train(config, progress=not args.quiet, log_line=lambda line: print(line, file=sys.stderr))  # ends "wrote LORA"
    return 0
