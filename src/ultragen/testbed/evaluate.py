"""``ultragen testbed eval``: every high-resolution strategy at 4x the base size, scored by the rule-based metrics.

For each evaluation scene (seeds EVAL_SEED0 + i, never trained on) the base-resolution sample is generated first;
it is the base row's image, the guide of the guide strategies and the warm-start image. Then each strategy runs
with and without warm start from the same noise. Rows report count / colour / position accuracy of the detector,
the seam ratio at the window borders, the PSNR of the downsampled output against the base sample (the guide) and
the detail ratio (fine detail against the true 4x renders).

Step cache settings (``EvalSettings.caches``): for each setting other than ``off`` the cache strategy
(``windows+guide+lora`` with warm start by default) is sampled again with that cache on, from the same noise; its row
adds the steps computed and skipped (transformer calls, summed over the batches) and the PSNR of its images against the uncached row's (same prompts and seeds; inf: equal).
"""

from __future__ import annotations

import copy
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ultragen.atomic import atomic_path
from ultragen.flux.lora import load_guide_lora, read_lora_metadata
from ultragen.policy import get_policy
from ultragen.step_cache import StepCacheConfig, parse_cache
from ultragen.testbed.metrics import (
    detail_ratio,
    detect,
    guide_psnr,
    high_frequency_energy,
    psnr_db,
    score,
    seam_ratio,
    to_tensor,
)
from ultragen.testbed.model import TestbedConfig
from ultragen.testbed.sample import SamplerSettings, Strategy, sample_base, sample_hires
from ultragen.testbed.scenes import Scene, render, sample_scene
from ultragen.testbed.train import EVAL_SEED0, TRAIN_SUPERSAMPLE, load_ema


@dataclass(frozen=True)
class EvalSettings:
    prompts: int = 32
    batch_size: int = 4
    scale: int = 4  # must equal the model config's rho: the base sample is the guide
    seed: int = 0  # noise seed (scenes are fixed: EVAL_SEED0 + i)
    strategies: tuple[Strategy, ...] = tuple(Strategy)
    lora_path: str | None = None  # guide LoRA for windows+guide+lora; without it that row is reported missing
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    grid_prompts: int = 3  # samples shown in the PNG grid
    caches: tuple[StepCacheConfig, ...] = (StepCacheConfig(),)  # step cache settings; each but off: one more row
    cache_strategy: Strategy = Strategy.GUIDE_LORA  # the strategy (with warm start) the cache rows sample

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", tuple(Strategy(s) for s in self.strategies))
        object.__setattr__(self, "caches", tuple(dict.fromkeys(parse_cache(c) for c in self.caches)))
        object.__setattr__(self, "cache_strategy", Strategy(self.cache_strategy))
        if any(c.enabled for c in self.caches) and (
                self.cache_strategy is Strategy.DENSE or self.cache_strategy not in self.strategies):
            raise ValueError(f"cache rows sample {self.cache_strategy.value} +warm against its uncached row: keep "
                             f"{self.cache_strategy.value} in the strategies (it must be hierarchical), or use "
                             f"--cache off")
        if self.prompts < 1 or self.batch_size < 1 or self.scale < 2:
            raise ValueError(f"prompts={self.prompts} and batch_size={self.batch_size} must be >= 1, scale >= 2")


@dataclass
class _Run:
    """Images of one row for all prompts: (N, 3, H, W) in [0, 1]; where its sampler started (hires rows)."""

    images: list[torch.Tensor] = field(default_factory=list)
    start_sigma: float | None = None
    steps_run: int | None = None
    steps_total: int = 0  # steps (transformer calls) over all batches
    steps_skipped: int = 0  # of them, skipped by the step cache

    def stacked(self) -> torch.Tensor:
        return torch.cat(self.images)


def evaluate(run_dir: str | Path, settings: EvalSettings, device: str = "cpu", progress: bool = True,
             log: Callable[[str], None] = print) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the results record, {row name: (N, 3, H, W) images}) for the model of ``run_dir``."""
    config, model, step = load_ema(run_dir, device)
    if torch.device(device).type == "cuda":
        model = model.to(torch.bfloat16)  # as FLUX runs: bf16 weights, fast kernels; latents stay float32
    if settings.scale != config.rho:
        raise ValueError(f"scale={settings.scale} must equal the testbed's rho={config.rho} (the base sample is the "
                         f"guide of the {config.rho}x image)")
    offset = _guide_offset_tokens(config, settings)  # refuses an offset outside [0, rho - 1] before sampling
    lora_model = _with_lora(model, settings.lora_path, config, settings, offset)
    scenes = [sample_scene(EVAL_SEED0 + i) for i in range(settings.prompts)]
    encoder, codec = config.text_encoder(), config.codec()
    rows: dict[str, _Run] = {"base": _Run()}
    jobs = [(s, w) for s in settings.strategies for w in (False, True)
            if s is not Strategy.GUIDE_LORA or lora_model is not None]
    jobs = [(s, w, StepCacheConfig()) for s, w in jobs] + [
        (settings.cache_strategy, True, c) for c in settings.caches
        if c.enabled and (settings.cache_strategy, True) in jobs]
    for name in (_row_name(s, w, c) for s, w, c in jobs):
        rows[name] = _Run()
    start = time.monotonic()
    batches = range(0, settings.prompts, settings.batch_size)
    bar = tqdm(total=len(batches) * (1 + len(jobs)), disable=not progress, desc="testbed eval", dynamic_ncols=True)
    for first in batches:
        chunk = scenes[first:first + settings.batch_size]
        prompt = encoder.encode_scenes(chunk)
        empty = encoder.encode_scenes([None] * len(chunk))
        noise_base, noise_hires = _noise(config, settings, first, len(chunk), device)
        guide = sample_base(model, config, prompt, empty, noise_base, settings.sampler)
        rows["base"].images.append(codec.decode(guide).clamp(0, 1).cpu())
        bar.update(1)
        for strategy, warm, cache in jobs:
            net = lora_model if strategy is Strategy.GUIDE_LORA else model
            sample = sample_hires(net, config, strategy, warm, guide, prompt, empty, noise_hires,
                                  replace(settings.sampler, step_cache=cache), settings.scale)
            row = rows[_row_name(strategy, warm, cache)]
            row.images.append(codec.decode(sample.latents).clamp(0, 1).cpu())
            row.start_sigma, row.steps_run = sample.start_sigma, sample.steps_run
            row.steps_skipped += sample.steps_skipped
            row.steps_total += sample.steps_run
            bar.update(1)
    bar.close()
    images = {name: run.stacked() for name, run in rows.items()}
    starts = {name: (run.start_sigma, run.steps_run, run.steps_total, run.steps_skipped)
              for name, run in rows.items()}
    record = _record(config, step, settings, scenes, images, jobs, time.monotonic() - start, model.dtype, offset,
                     starts)
    return record, images


def _guide_offset_tokens(config: TestbedConfig, settings: EvalSettings) -> float:
    """The guide position offset this evaluation uses (the settings' value, or the layout's centred default)."""
    return config.layout(settings.scale, guide_offset_tokens=settings.sampler.guide_offset_tokens).guide_offset_tokens


def _with_lora(model: torch.nn.Module, path: str | None, config: TestbedConfig,
               settings: EvalSettings, guide_offset_tokens: float) -> torch.nn.Module | None:
    """A copy of ``model`` with the guide LoRA of ``path``, refused when it was trained under another attention
    policy, window or rho than this evaluation uses (the base model's path is not compared: runs move)."""
    if path is None:
        return None
    meta = read_lora_metadata(path)
    expected = replace(meta, policy=get_policy(settings.sampler.policy).to_dict(), rho=config.rho,
                       window_tokens=config.window_tokens, ntk_factor=1.0,
                       guide_offset_tokens=guide_offset_tokens)
    if diff := meta.mismatches(expected):
        raise ValueError(f"LoRA {path!r} was trained under other settings than this evaluation ({'; '.join(diff)}); "
                         f"pass the LoRA's policy with --policy")
    lora_model = copy.deepcopy(model)
    load_guide_lora(lora_model, path)
    return lora_model


def _row_name(strategy: Strategy, warm: bool, cache: StepCacheConfig = StepCacheConfig()) -> str:
    return f"{strategy.value}{' +warm' if warm else ''}{f' cache={cache}' if cache.enabled else ''}"


def _noise(config: TestbedConfig, settings: EvalSettings, first: int, n: int, device) -> tuple[torch.Tensor, ...]:
    """Per-prompt noise (the same for every strategy), independent of the batch size."""
    c, base = config.codec().channels, config.base_tokens
    out_base, out_hires = [], []
    for i in range(first, first + n):
        g = torch.Generator().manual_seed(settings.seed * 1_000_003 + i)
        out_base.append(torch.randn(1, c, base, base, generator=g))
        out_hires.append(torch.randn(1, c, base * settings.scale, base * settings.scale, generator=g))
    return torch.cat(out_base).to(device), torch.cat(out_hires).to(device)


def _scores(scenes: list[Scene], images: torch.Tensor) -> dict:
    s = score(scenes, [detect(im) for im in images])
    return {"count_acc": s.count_acc, "color_acc": s.color_acc, "position_acc": s.position_acc}


def _record(config: TestbedConfig, step: int, settings: EvalSettings, scenes: list[Scene],
            images: dict[str, torch.Tensor], jobs, seconds: float, dtype: torch.dtype,
            guide_offset_tokens: float, starts: dict[str, tuple[float, int, int, int]]) -> dict:
    window_px, token_px, factor = config.window_px, config.token_px, settings.scale
    base = images["base"]
    hires_px = config.base_px * factor
    # the true 4x images, rendered as the training data are: the detail reference
    truth = torch.stack([to_tensor(render(s, hires_px, supersample=TRAIN_SUPERSAMPLE)) for s in scenes])
    truth_energy = high_frequency_energy(truth, factor)
    rows = []
    for strategy, warm, cache in jobs:
        out = images[_row_name(strategy, warm, cache)]
        start_sigma, steps_run, steps_total, steps_skipped = starts[_row_name(strategy, warm, cache)]
        uncached = images[_row_name(strategy, warm)]
        rows.append({"strategy": strategy.value, "warm_start": warm, "cache": str(cache), "start_sigma": start_sigma,
                     "steps_run": steps_run, "steps_computed": steps_total - steps_skipped,
                     "steps_skipped": steps_skipped, **_scores(scenes, out),
                     "seam_ratio": seam_ratio(out, window_px, token_px), "guide_psnr": guide_psnr(out, base),
                     "detail_ratio": detail_ratio(out, truth_energy, factor),
                     # PSNR against the same strategy without the cache, same prompts and seeds (inf: equal)
                     "psnr_vs_uncached": psnr_db(out, uncached)})
    clean = torch.stack([to_tensor(render(s, hires_px, supersample=1)) for s in scenes[: min(8, len(scenes))]])
    upsampled = F.interpolate(base, size=hires_px, mode="bicubic", align_corners=False)
    missing = [] if any(s is Strategy.GUIDE_LORA for s, _, _ in jobs) else (
        ["windows+guide+lora: no guide LoRA given (--lora); train one with `ultragen train` on testbed data"]
        if Strategy.GUIDE_LORA in settings.strategies else [])
    if any(c.enabled for c in settings.caches) and not any(c.enabled for _, _, c in jobs):
        missing.append(f"cache rows: {settings.cache_strategy.value} +warm did not run (no guide LoRA: --lora)")
    return {
        "base": _scores(scenes, base),
        "rows": rows,
        "reference": {"clean_render_seam_ratio": seam_ratio(clean, window_px, token_px),
                      "base_seam_ratio": seam_ratio(base, window_px, token_px),
                      # the base sample bicubic-upsampled: what a warm start would keep if it added nothing
                      "upsampled_base_detail_ratio": detail_ratio(upsampled, truth_energy, factor)},
        "missing": missing,
        "model": {"config": config.to_dict(), "train_step": step},
        "settings": {**asdict(settings), "strategies": [s.value for s in settings.strategies],
                     "caches": [str(c) for c in settings.caches], "cache_strategy": settings.cache_strategy.value,
                     "sampler": {**asdict(settings.sampler), "step_cache": "per row"},
                     "policy": get_policy(settings.sampler.policy).to_dict(),
                     "guide_offset_tokens": guide_offset_tokens},  # resolved (None: centred)
        "prompts": [s.caption for s in scenes],
        "seconds": seconds,
        "host": {"torch": torch.__version__, "python": platform.python_version(), "model_dtype": str(dtype),
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
    }


def write_results(record: dict, images: dict[str, torch.Tensor], json_path: str | Path, grid_path: str | Path | None,
                  grid_prompts: int = 3) -> None:
    """The record as JSON and the sample grid as an image (format from the name, default PNG), each written atomically (a failure leaves no partial file)."""
    text = json.dumps(record, indent=2) + "\n"  # serialised before anything is written
    with atomic_path(json_path) as tmp:
        tmp.write_text(text)
    if grid_path is not None:
        grid = sample_grid(images, grid_prompts)
        with atomic_path(grid_path) as tmp:
            grid.save(tmp, format=Image.registered_extensions().get(Path(grid_path).suffix.lower(), "PNG"))


def sample_grid(images: dict[str, torch.Tensor], prompts: int = 3) -> Image.Image:
    """One row per strategy (base upsampled to the hires size with nearest neighbours), one column per prompt."""
    size = max(im.shape[-1] for im in images.values())
    pad = 4
    names = list(images)
    n = min(prompts, len(images["base"]))
    canvas = np.ones((len(names) * (size + pad), n * (size + pad), 3), dtype=np.float32)
    for r, name in enumerate(names):
        for c in range(n):
            im = images[name][c]
            im = torch.nn.functional.interpolate(im[None], size=size, mode="nearest")[0]
            canvas[r * (size + pad): r * (size + pad) + size, c * (size + pad): c * (size + pad) + size] = \
                im.permute(1, 2, 0).numpy()
    return Image.fromarray((canvas * 255).round().astype(np.uint8))
