"""``ultragen train``: the guide LoRA's training loop (accelerate: one process or ``accelerate launch`` for several).

Each process draws its own micro-batches (``Sampler``), computes the flow-matching loss through the same
hierarchical forward and attention policy as inference (exact ``reference`` attention, which has a backward), and
accumulates gradients; only the main process writes files. See docs/design.md, "Training".
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ultragen.flux import HierFluxTransformer
from ultragen.flux.lora import LoraMetadata
from ultragen.layout import HierLayout, make_layout
from ultragen.policy import build_plan, get_policy
from ultragen.train import rundir
from ultragen.train.cache import MANIFEST, TrainingCache, normalise_model
from ultragen.train.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from ultragen.train.config import LrSchedule, Optimizer, TrainConfig
from ultragen.train.model import add_trainable_lora, load_transformer
from ultragen.train.objective import Sampler, draw, flow_loss, step_generator, validation_loss

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    lora_path: Path
    steps: int
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "grad_norm"} per optimizer step
    val_losses: dict[int, float] = field(default_factory=dict)
    transformer: torch.nn.Module | None = None  # the trained model (base weights untouched, LoRA adapter added)


def make_accelerator():
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # the last layer's guide queries feed nothing (guide outputs are discarded): their LoRA gets no gradient
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    precision = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=precision, kwargs_handlers=[ddp])


def training_layout(config: TrainConfig, cache: TrainingCache) -> HierLayout:
    m = cache.manifest
    try:
        return make_layout(m.size_px, m.size_px, window_tokens=config.window_tokens or m.window_tokens, rho=m.rho,
                           text_tokens=m.text_tokens, block_tokens=config.block_tokens or m.block_tokens, pad=False)
    except ValueError as error:
        raise ValueError(f"the cache {cache.root / MANIFEST} ({m.size_px} px, rho {m.rho}) does not fit this "
                         f"layout: {error}") from None


def split_items(count: int, val_items: int | None) -> tuple[tuple[int, ...], list[int]]:
    """(training items, held-out validation items): the last ``val_items`` of the cache are held out."""
    if val_items is None:
        val_items = min(8, max(1, count // 10)) if count >= 2 else 0
    if count - val_items < 1:
        raise ValueError(f"the cache holds {count} items and {val_items} are held out for validation, leaving none "
                         f"to train on; add images or pass a smaller --val-items (0: no validation loss)")
    return tuple(range(count - val_items)), list(range(count - val_items, count))


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    warmup, total, cosine = config.warmup_steps, config.steps, config.lr_schedule is LrSchedule.COSINE

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cosine:
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer is Optimizer.PRODIGY:
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ValueError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt "
                             "(or pip install 'ultragen[train]'); or use --optimizer adamw") from None
        return Prodigy(params, lr=config.learning_rate, weight_decay=config.weight_decay, use_bias_correction=True,
                       safeguard_warmup=True)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def lora_metadata(config: TrainConfig, layout: HierLayout, step: int) -> LoraMetadata:
    extra = {"steps": step, "cache": str(Path(config.cache_dir).expanduser().resolve()), "size_px": layout.height_px,
             "block_tokens": layout.block_tokens, "text_tokens": layout.text_tokens, "train": config.to_record()}
    return LoraMetadata(base_model=normalise_model(config.model), policy=get_policy(config.policy).to_dict(),
                        rho=layout.rho, guide_offset_tokens=layout.guide_offset_tokens, ntk_factor=config.ntk_factor,
                        window_tokens=layout.window_tokens, rank=config.rank, alpha=config.alpha,
                        targets=config.targets, extra=extra)


def _restore(checkpoint_path: Path, transformer, optimizer, scheduler, config: TrainConfig, world_size: int):
    """Load a checkpoint's LoRA, optimizer, scheduler and RNG states; returns (step, history)."""
    ckpt = load_checkpoint(checkpoint_path)
    if ckpt.step >= config.steps:
        raise ValueError(f"--resume: {str(checkpoint_path)!r} is at step {ckpt.step} and --steps is {config.steps}; "
                         f"pass a larger --steps to train further")
    if ckpt.state.get("world_size") != world_size:
        log.warning("resuming a %s-process run on %s processes: batches differ from the uninterrupted run",
                    ckpt.state.get("world_size"), world_size)
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ultragen.flux.lora import ADAPTER_NAME, KEY_PREFIX

    state = {k.removeprefix(KEY_PREFIX): v for k, v in load_file(ckpt.lora_path).items()}
    with torch.no_grad():
        set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    restore_rng(ckpt.rng["tensors"], ckpt.rng["states"])
    return ckpt.step, list(ckpt.state["history"]), {int(k): v for k, v in ckpt.state.get("val", {}).items()}


def train(config: TrainConfig, progress: bool = True, log_line: Callable[[str], None] = print,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run (or resume) the training described by ``config``; returns the final LoRA path and the loss history.

    ``on_step(step, record)`` is called after each optimizer step (after its checkpoint, if any)."""
    accelerator = make_accelerator()
    main = accelerator.is_main_process
    run_dir = Path(config.out_dir).expanduser()
    resume_from = rundir.check_run_dir(run_dir, config)
    cache = TrainingCache(config.cache_dir)
    cache.check_run(config.model, config.size_px, config.rho)
    device = accelerator.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = load_transformer(config.model, dtype)
    cache.check_transformer(config.model, transformer.config)
    layout = training_layout(config, cache)
    plan = build_plan(layout, config.policy)
    train_items, val_items = split_items(len(cache), config.val_items)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the LoRA's A matrices: the same initial adapter for the same seed
        params = add_trainable_lora(transformer, config.rank, config.alpha, config.targets)
    hier = HierFluxTransformer(transformer, backend="reference", ntk_factor=config.ntk_factor, cache_guide=False)
    hier.enable_gradient_checkpointing(config.gradient_checkpointing)
    optimizer = make_optimizer(config, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    model, optimizer = accelerator.prepare(hier, optimizer)
    guidance = config.guidance if transformer.config.guidance_embeds else None
    sampler = Sampler(train_items, config.seed, config.batch_size, config.grad_accum, accelerator.num_processes)

    start, history, val_losses = 0, [], {}
    if resume_from is not None:
        start, history, val_losses = _restore(resume_from, transformer, optimizer, scheduler, config,
                                              accelerator.num_processes)
    if main:
        if resume_from is None:
            rundir.write_run_config(run_dir, config)
        else:
            kept = rundir.retire_final_lora(run_dir, start)
            rundir.append_log(run_dir, {"event": "resume", "step": start, "from": str(resume_from)})
            if kept:
                log_line(f"kept the earlier final LoRA as {kept}")
        log_line(f"training {len(params)} LoRA tensors ({sum(p.numel() for p in params):,} parameters) on "
                 f"{len(train_items)} items ({len(val_items)} held out), {layout.height_px} px, rho {layout.rho}, "
                 f"{accelerator.num_processes} process(es), {device}, steps {start}..{config.steps}")

    def validate(step: int) -> None:
        if not val_items:
            return
        if main:
            with accelerator.autocast():
                value = validation_loss(hier, cache, val_items, layout, plan, guidance, device, dtype)
            val_losses[step] = value
            rundir.append_log(run_dir, {"step": step, "val_loss": value})
            log_line(f"step {step}: validation loss {value:.5f}")
            if config.validate_prompts:
                from ultragen.train.samples import write_samples

                write_samples(transformer, config, layout, run_dir, step, log_line)
        accelerator.wait_for_everyone()

    if resume_from is None:
        validate(0)
    bar = tqdm(range(start, config.steps), desc="train", disable=not (progress and main), initial=start,
               total=config.steps)
    for step in bar:
        began = time.perf_counter()
        micro_losses = []
        for micro in range(config.grad_accum):
            g = step_generator(config.seed, step, micro, accelerator.process_index)
            batch = cache.load(sampler.items(step, micro, accelerator.process_index))
            noised = draw(cache, batch, layout, g, config.caption_dropout, config.logit_mean, config.logit_std)
            sync = micro == config.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss = flow_loss(model, noised, plan, guidance, device, dtype)
                accelerator.backward(loss / config.grad_accum)
            micro_losses.append(loss.detach())
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        step_loss = float(accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean"))
        record = {"step": done, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "s": round(time.perf_counter() - began, 4)}
        history.append(record)
        if main:
            rundir.append_log(run_dir, record)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if done % config.validate_every == 0 or done == config.steps:
            validate(done)
        if main and (done % config.save_every == 0 or done == config.steps):
            state = {"world_size": accelerator.num_processes, "config": config.to_record(), "history": history,
                     "val": val_losses}
            save_checkpoint(run_dir, done, transformer, lora_metadata(config, layout, done), optimizer, scheduler,
                            state)
        accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(done, record)
    bar.close()
    lora_path = run_dir / rundir.FINAL_LORA
    if main:
        from ultragen.flux.lora import save_guide_lora

        save_guide_lora(transformer, lora_path, lora_metadata(config, layout, config.steps))
        log_line(f"wrote {lora_path}")
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, lora_path, config.steps, history, val_losses, transformer)


