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

from ultragen.family import ModelFamily, family_of_model
from ultragen.flux.lora import LoraMetadata
from ultragen.layout import HierLayout, make_layout
from ultragen.pipeline.loading import normalise_model
from ultragen.policy import build_plan, get_policy
from ultragen.train import rundir
from ultragen.train.cache import MANIFEST, TrainingCache
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
    cuda = torch.cuda.is_available()
    # cpu=True on a CPU-only machine: without it accelerate ignores torchrun's WORLD_SIZE there and every process
    # would train (and write) alone
    return Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda, kwargs_handlers=[ddp])


def training_layout(config: TrainConfig, cache: TrainingCache) -> HierLayout:
    m = cache.manifest
    try:
        return make_layout(m.size_px, m.size_px, window_tokens=config.window_tokens or m.window_tokens, rho=m.rho,
                           text_tokens=m.text_tokens, block_tokens=config.block_tokens or m.block_tokens, pad=False,
                           guide_offset_tokens=config.guide_offset_tokens)
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


@dataclass
class _Run:
    """Everything one training process holds (built by :func:`_build`)."""

    config: TrainConfig
    accelerator: object
    run_dir: Path
    cache: TrainingCache
    layout: HierLayout
    plan: object
    transformer: torch.nn.Module
    hier: torch.nn.Module  # the family's hierarchical transformer
    model: torch.nn.Module  # hier as prepared by accelerate (DDP-wrapped with several processes)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: Sampler
    val_items: list[int]
    guidance: float | None
    dtype: torch.dtype
    log_line: Callable[[str], None]
    family: ModelFamily
    history: list[dict] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _build(config: TrainConfig, run_dir: Path, log_line) -> _Run:
    accelerator = make_accelerator()
    cache = TrainingCache(config.cache_dir)
    cache.check_run(config.model, config.size_px, config.rho)  # before any weights are loaded
    dtype = torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32
    family = family_of_model(config.model)
    transformer = load_transformer(config.model, dtype)
    cache.check_transformer(config.model, transformer.config)
    layout = training_layout(config, cache)
    train_items, val_items = split_items(len(cache), config.val_items)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the LoRA's A matrices: the same initial adapter for the same seed
        params = add_trainable_lora(transformer, config.rank, config.alpha, config.targets, family)
    hier = family.hierarchical(transformer, backend="reference", ntk_factor=config.ntk_factor, cache_guide=False)
    hier.enable_gradient_checkpointing(config.gradient_checkpointing)
    optimizer = make_optimizer(config, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    model, optimizer = accelerator.prepare(hier, optimizer)
    sampler = Sampler(train_items, config.seed, config.batch_size, config.grad_accum, accelerator.num_processes)
    guidance = config.guidance if getattr(transformer.config, "guidance_embeds", False) else None
    return _Run(config, accelerator, run_dir, cache, layout, build_plan(layout, config.policy), transformer, hier,
                model, params, optimizer, scheduler, sampler, val_items, guidance, dtype, log_line, family)


def _validate(run: _Run, step: int) -> None:
    """Held-out loss (and samples with --validate-prompts) on the main process; the others wait."""
    if run.val_items and run.main:
        with run.accelerator.autocast():
            value = validation_loss(run.hier, run.cache, run.val_items, run.layout, run.plan, run.guidance,
                                    run.accelerator.device, run.dtype, run.family)
        run.val_losses[step] = value
        rundir.append_log(run.run_dir, {"step": step, "val_loss": value})
        run.log_line(f"step {step}: validation loss {value:.5f}")
        if run.config.validate_prompts:
            from ultragen.train.samples import write_samples

            write_samples(run.transformer, run.config, run.layout, run.run_dir, step, run.log_line)
    run.accelerator.wait_for_everyone()


def _step(run: _Run, step: int) -> dict:
    """One optimizer step (``grad_accum`` micro-batches); returns its log record."""
    config, acc = run.config, run.accelerator
    began = time.perf_counter()
    losses = []
    for micro in range(config.grad_accum):
        g = step_generator(config.seed, step, micro, acc.process_index)
        batch = run.cache.load(run.sampler.items(step, micro, acc.process_index))
        noised = draw(run.cache, batch, run.layout, g, config.caption_dropout, config.logit_mean, config.logit_std)
        last = micro == config.grad_accum - 1
        with contextlib.nullcontext() if last else acc.no_sync(run.model):  # all-reduce once per step
            loss = flow_loss(run.model, noised, run.plan, run.guidance, acc.device, run.dtype, run.family)
            acc.backward(loss / config.grad_accum)
        losses.append(loss.detach())
    grad_norm = acc.clip_grad_norm_(run.params, config.max_grad_norm) if config.max_grad_norm > 0 else None
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": float(acc.reduce(torch.stack(losses).mean(), reduction="mean")),
            "lr": run.scheduler.get_last_lr()[0], "grad_norm": None if grad_norm is None else float(grad_norm),
            "s": round(time.perf_counter() - began, 4)}


def _save(run: _Run, step: int) -> None:
    state = {"world_size": run.accelerator.num_processes, "config": run.config.to_record(), "history": run.history,
             "val": run.val_losses}
    save_checkpoint(run.run_dir, step, run.transformer, lora_metadata(run.config, run.layout, step), run.optimizer,
                    run.scheduler, state)


def _start(run: _Run, resume_from: Path | None) -> int:
    """Restore a checkpoint or record a new run; returns the first step to run."""
    start = 0
    if resume_from is not None:
        start, run.history, run.val_losses = _restore(resume_from, run.transformer, run.optimizer, run.scheduler,
                                                      run.config, run.accelerator.num_processes)
    if run.main:
        if resume_from is None:
            rundir.write_run_config(run.run_dir, run.config)
        else:
            if kept := rundir.retire_final_lora(run.run_dir, start):
                run.log_line(f"kept the earlier final LoRA as {kept}")
            rundir.append_log(run.run_dir, {"event": "resume", "step": start, "from": str(resume_from)})
        run.log_line(f"training {len(run.params)} LoRA tensors ({sum(p.numel() for p in run.params):,} parameters) "
                     f"on {len(run.sampler.train_items)} items ({len(run.val_items)} held out), "
                     f"{run.layout.height_px} px, rho {run.layout.rho}, {run.accelerator.num_processes} process(es), "
                     f"{run.accelerator.device}, steps {start}..{run.config.steps}")
    if resume_from is None:
        _validate(run, 0)
    return start


def train(config: TrainConfig, progress: bool = True, log_line: Callable[[str], None] = print,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run (or resume) the training described by ``config``; returns the final LoRA path and the loss history.

    ``on_step(step, record)`` is called after each optimizer step (after its checkpoint, if any)."""
    run_dir = Path(config.out_dir).expanduser()
    resume_from = rundir.check_run_dir(run_dir, config)
    run = _build(config, run_dir, log_line)
    start = _start(run, resume_from)
    bar = tqdm(range(start, config.steps), desc="train", disable=not (progress and run.main), initial=start,
               total=config.steps)
    for step in bar:
        record = _step(run, step)
        done = record["step"]
        run.history.append(record)
        if run.main:
            rundir.append_log(run_dir, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if done % config.validate_every == 0 or done == config.steps:
            _validate(run, done)
        if run.main and (done % config.save_every == 0 or done == config.steps):
            _save(run, done)
        run.accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(done, record)
    bar.close()
    lora_path = run_dir / rundir.FINAL_LORA
    if run.main:
        run.family.save_guide_lora(run.transformer, lora_path, lora_metadata(config, run.layout, config.steps))
        log_line(f"wrote {lora_path}")
    run.accelerator.wait_for_everyone()
    return TrainResult(run_dir, lora_path, config.steps, run.history, run.val_losses, run.transformer)
