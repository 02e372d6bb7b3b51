"""Training the testbed model from scratch: flow matching on freshly rendered scenes at the base resolution.

x_t = (1 - t) x0 + t eps, target v = eps - x0, t = sigmoid(N(logit_mean, logit_std^2)); the loss is the MSE over
all image tokens; ``caption_dropout`` of the captions are replaced by the empty caption (for classifier-free
guidance). Every batch is a pure function of (seed, step): the scenes of step s are ``train_seeds(seed, step,
batch)`` and the noise comes from a generator seeded by (seed, step), so a run stopped and resumed computes what
the uninterrupted run would have. An exponential moving average (EMA) of the weights is what samples use.

Run folder::

    RUN_DIR/testbed.json           the TestbedConfig (a resumed run must use the same)
    RUN_DIR/checkpoint/            model.safetensors, ema.safetensors, optimizer.pt, state.json (written atomically)
    RUN_DIR/model/transformer/     the EMA model, diffusers format (``ultragen train --model RUN_DIR/model``)
    RUN_DIR/log.jsonl              one line per logged step: step, loss, lr, seconds
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ultragen.atomic import atomic_folder, atomic_path
from ultragen.testbed.model import TestbedConfig, raster_ids
from ultragen.testbed.scenes import render, sample_scene

EVAL_SEED0 = 1_000_000_000  # evaluation scenes are seeds EVAL_SEED0 + i; training never reaches them
_CHECKPOINT = "checkpoint"
_OLD = _CHECKPOINT + ".old"  # atomic_folder moves the previous checkpoint here while swapping
TRAIN_SUPERSAMPLE = 2  # point samples per pixel side of every training render (base model, LoRA cache, eval truth)
# cuDNN's fused attention backward fails on an H100 (torch 2.11) for bf16 batches of 8 or more of the base preset
# ("mha_graph.execute(...).is_good()", also seen as CUBLAS_STATUS_EXECUTION_FAILED); flash and memory-efficient SDPA
# train it, so training leaves cuDNN out.
_TRAIN_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 2000  # total optimiser steps of the run (a resumed run continues to this)
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    log_every: int = 25
    seed: int = 0
    supersample: int = TRAIN_SUPERSAMPLE
    workers: int = 0  # DataLoader processes that render scenes (0: in the training process)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "supersample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 < self.lr < 1 or not 0 <= self.ema_decay < 1 or not 0 <= self.caption_dropout < 1:
            raise ValueError(f"need 0 < lr={self.lr} < 1, 0 <= ema_decay={self.ema_decay} < 1 and "
                             f"0 <= caption_dropout={self.caption_dropout} < 1")


def train_seeds(seed: int, step: int, batch_size: int) -> list[int]:
    """Scene seeds of one step (disjoint from evaluation seeds as long as seed * 1e8 + step * batch < 1e9)."""
    first = seed * 100_000_000 + step * batch_size
    if first + batch_size > EVAL_SEED0:
        raise ValueError(f"training seeds of step {step} would reach the evaluation scenes; use a smaller seed")
    return list(range(first, first + batch_size))


def render_latents(config: TestbedConfig, seeds: list[int], scale: int = 1,
                   supersample: int = TRAIN_SUPERSAMPLE) -> torch.Tensor:
    """(B, C, base * scale, base * scale) clean latents of the scenes of ``seeds``."""
    images = np.stack([render(sample_scene(s), config.base_px * scale, supersample) for s in seeds])
    return config.codec().encode(torch.from_numpy(images).permute(0, 3, 1, 2))


class _Batches(torch.utils.data.IterableDataset):
    """Steps start, start+1, ...: (latents, embeds, pooled, t, eps) of each, rendered in worker processes."""

    def __init__(self, config: TestbedConfig, settings: TrainSettings, start: int):
        self.config, self.settings, self.start = config, settings, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + worker, self.settings.steps, workers):
            yield self.batch(step)

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        s, cfg = self.settings, self.config
        seeds = train_seeds(s.seed, step, s.batch_size)
        x0 = render_latents(cfg, seeds, supersample=s.supersample)
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        keep = torch.rand(len(seeds), generator=g) >= s.caption_dropout
        prompt = cfg.text_encoder().encode_scenes([sample_scene(x) if k else None for x, k in zip(seeds, keep)])
        t = torch.sigmoid(torch.randn(len(seeds), generator=g) * s.logit_std + s.logit_mean)
        eps = torch.randn(x0.shape, generator=g)
        return x0, prompt.embeds, prompt.pooled, t, eps


def flow_loss(model, config: TestbedConfig, x0, embeds, pooled, t, eps) -> torch.Tensor:
    """MSE of the predicted velocity at x_t = (1 - t) x0 + t eps against eps - x0 (latents (B, C, n, n))."""
    n = config.base_tokens
    tt = t.view(-1, 1, 1, 1)
    x_t = ((1 - tt) * x0 + tt * eps).flatten(2).transpose(1, 2)
    target = (eps - x0).flatten(2).transpose(1, 2)
    pred = model(hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                 img_ids=raster_ids(n, n).to(x0.device), txt_ids=torch.zeros(embeds.shape[1], 3, device=x0.device),
                 return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def train(config: TestbedConfig, settings: TrainSettings, run_dir: str | Path, device: str = "auto",
          progress: bool = True, max_minutes: float | None = None, log: Callable[[str], None] = print) -> int:
    """Train (or resume) the run in ``run_dir`` up to ``settings.steps`` or ``max_minutes``; returns the step
    reached. A checkpoint is written every ``checkpoint_every`` steps and when stopping."""
    run_dir = Path(run_dir)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    _check_run_config(run_dir, config)
    model = config.build_model(settings.seed).to(dev).train()
    ema = config.build_model(settings.seed).to(dev).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step = _resume(run_dir, model, ema, optimizer, dev, log)
    if step >= settings.steps:
        log(f"run {run_dir} is already at step {step} >= steps={settings.steps}; nothing to do")
        return step
    loader = torch.utils.data.DataLoader(_Batches(config, settings, step), batch_size=None,
                                         num_workers=settings.workers, persistent_workers=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    start, deadline = time.monotonic(), None if max_minutes is None else time.monotonic() + 60 * max_minutes
    bar = tqdm(total=settings.steps, initial=step, disable=not progress, desc="testbed train", dynamic_ncols=True)
    losses: list[float] = []
    for batch in loader:
        lr = settings.lr * min(1.0, (step + 1) / settings.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast, sdpa_kernel(_TRAIN_SDPA):
            loss = flow_loss(model, config, *(x.to(dev) for x in batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        _ema_update(ema, model, min(settings.ema_decay, (1 + step) / (10 + step)))
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % settings.log_every == 0 or step == settings.steps:
            record = {"step": step, "loss": sum(losses) / len(losses), "lr": lr, "seconds": time.monotonic() - start}
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            losses = []
        out_of_time = deadline is not None and time.monotonic() > deadline
        if step % settings.checkpoint_every == 0 or step == settings.steps or out_of_time:
            save_checkpoint(run_dir, step, model, ema, optimizer, settings)
        if out_of_time:
            log(f"stopped at step {step} after {max_minutes} min; run the same command again to resume")
            break
    bar.close()
    export_model(ema, run_dir / "model")
    return step


def export_model(ema: torch.nn.Module, folder: Path) -> None:
    """The EMA model as a transformer-only diffusers folder, loadable by ``ultragen train --model FOLDER``; built
    in a temporary folder and swapped in whole (a failure leaves the previous export, never a part)."""
    index = {"_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "FluxTransformer2DModel"]}
    with atomic_folder(folder) as tmp:
        ema.save_pretrained(tmp / "transformer")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def _check_run_config(run_dir: Path, config: TestbedConfig) -> None:
    path = run_dir / "testbed.json"
    if path.exists():
        saved = TestbedConfig.from_dict(json.loads(path.read_text()))
        if saved != config:
            raise ValueError(f"{run_dir} holds a run of testbed config {saved.name!r} ({saved}); resume it with the "
                             f"same preset or use another run folder")
    else:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(config.to_dict(), indent=2))


def save_checkpoint(run_dir: Path, step: int, model, ema, optimizer, settings: TrainSettings) -> Path:
    """Write RUN_DIR/checkpoint atomically: build it in a temporary folder, then swap it in."""
    final = run_dir / _CHECKPOINT
    with atomic_folder(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "settings": asdict(settings)}, indent=2))
    return final


def _resume(run_dir: Path, model, ema, optimizer, device: torch.device, log) -> int:
    folder = run_dir / _CHECKPOINT
    if not folder.exists() and (run_dir / _OLD).exists():
        folder = run_dir / _OLD  # a crash between the two renames
    if not folder.exists():
        return 0
    model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
    ema.load_state_dict(load_file(folder / "ema.safetensors", device=str(device)))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
    step = json.loads((folder / "state.json").read_text())["step"]
    log(f"resumed {run_dir} at step {step}")
    return step


def load_config(run_dir: str | Path) -> TestbedConfig:
    path = Path(run_dir) / "testbed.json"
    if not path.exists():
        raise ValueError(f"{run_dir} is not a testbed run; train one with `ultragen testbed train --run-dir {run_dir}`")
    return TestbedConfig.from_dict(json.loads(path.read_text()))


def load_ema(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[TestbedConfig, torch.nn.Module, int]:
    """(config, EMA model in eval mode, step) of a run's latest checkpoint."""
    run_dir = Path(run_dir)
    folder = run_dir / _CHECKPOINT
    config = load_config(run_dir)
    if not folder.exists():
        raise ValueError(f"{run_dir} has no checkpoint yet; run `ultragen testbed train --run-dir {run_dir}`")
    model = config.build_model().to(device).eval().requires_grad_(False)
    model.load_state_dict(load_file(folder / "ema.safetensors", device=str(device)))
    step = json.loads((folder / "state.json").read_text())["step"]
    return config, model, step


def loss_curve(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

