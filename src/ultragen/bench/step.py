"""``ultragen bench step``: seconds per transformer step and peak memory, dense vs hierarchical, in one run.

A real architecture (``--family flux1 --config dev``: FLUX.1-dev, the default; ``--family flux2 --config
klein-4b|klein-9b``; :data:`ultragen.bench.models.CONFIGS`) with random bf16 weights, batch 1, text 512. Dense: the
stock diffusers model (FluxTransformer2DModel / Flux2Transformer2DModel) with cuDNN SDPA over the plain sequence.
Hierarchical: the family's hierarchical transformer with each attention backend, the
guide cache warm (its one pass per image is not a step). Each configuration eager and compiled (regional
``torch.compile`` of the blocks), then the same with FP8 linears (torchao), whose step output is also compared with
the bf16 one (relative L2 error). Times are wall-clock medians (device synchronised) after a warm-up call.
Optionally the hierarchical step again with the feed-forward chunked over tokens (``ff_chunk_tokens``, one variant
per chunk size) and without the guide cache (``guide_cache``: the guide's rows computed in every step).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ultragen.bench.models import FLUX1_DEV
from ultragen.family import family_named
from ultragen.flux.blocks import check_ff_chunk_tokens
from ultragen.flux.fp8 import fp8_unavailable, quantize_blocks_fp8
from ultragen.layout import make_layout
from ultragen.policy import build_plan

SIZES_PX = (1024, 2048, 4096, 8192)
HIER_BACKENDS = ("flex", "triton", "triton-int8")


@dataclass(frozen=True)
class StepRow:
    size: str
    mode: str  # "dense" | "hier"
    backend: str
    compile: bool
    fp8: bool
    s_per_step: float
    peak_gb: float
    rel_err_vs_bf16: float | None = None
    ff_chunk_tokens: int | None = None  # hierarchical feed-forward over token chunks of this size; None: unchunked
    guide_cache: bool = True  # hierarchical: the guide's keys and values computed once (False: in every step)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_s(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Median wall time of ``fn`` (device synchronised; steps take 0.1-100 s) after one warm-up call; with
    ``repeats=0`` the first call itself is timed (for eager steps of a minute and more)."""
    if repeats == 0:
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        return time.perf_counter() - start, out
    out = fn()  # warm-up: compiles, builds cuDNN plans, fills the guide cache
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


def _dense_call(family, model, size_px: int, text_tokens: int, block_tokens: int,
                window_tokens: int) -> Callable[[], torch.Tensor]:
    layout = make_layout(size_px, size_px, rho=None, text_tokens=text_tokens, block_tokens=block_tokens,
                         window_tokens=window_tokens)
    inputs = family.random_step_inputs(model, layout)
    kernel = [SDPBackend.CUDNN_ATTENTION] if model.device.type == "cuda" else [SDPBackend.MATH]

    def call():
        with torch.no_grad(), sdpa_kernel(kernel):
            return family.dense_step(model, inputs, layout)

    return call


def _hier_call(family, hier, size_px: int, text_tokens: int, block_tokens: int,
               window_tokens: int) -> Callable[[], torch.Tensor]:
    layout = make_layout(size_px, size_px, text_tokens=text_tokens, block_tokens=block_tokens,
                         window_tokens=window_tokens)
    plan = build_plan(layout)
    inputs = family.random_step_inputs(hier.transformer, layout)

    def call():
        with torch.no_grad():
            return family.hier_step(hier, inputs, plan)

    return call


def _measure(label: dict, fn: Callable[[], torch.Tensor], repeats: int, log) -> tuple[StepRow | None, torch.Tensor | None]:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds, out = median_s(fn, repeats)
    except Exception as error:  # noqa: BLE001 - one failing configuration must not lose the others
        log(f"{label}: failed: {type(error).__name__}: {str(error)[:300]}")
        return None, None
    row = StepRow(**label, s_per_step=seconds, peak_gb=_peak_gb())
    variant = f" ff_chunk={row.ff_chunk_tokens}" if row.ff_chunk_tokens is not None else ""
    variant += "" if row.guide_cache or row.mode == "dense" else " no guide cache"
    log(f"{row.size:>10} {row.mode:<5} {row.backend:<12} compile={row.compile!s:<5} fp8={row.fp8!s:<5} "
        f"{row.s_per_step:8.3f} s  {row.peak_gb:6.1f} GB{variant}")
    return row, out


def run_step_bench(sizes_px: Sequence[int] = SIZES_PX, backends: Sequence[str] = HIER_BACKENDS,
                   compile_modes: Sequence[bool] = (False, True), precisions: Sequence[str] = ("bf16", "fp8"),
                   dense: bool = True,
                   dense_compile_max_px: int = 8192, repeats: int = 2, log=print, config: dict = FLUX1_DEV,
                   device: str = "cuda", text_tokens: int = 512, block_tokens: int = 128,
                   window_tokens: int = 16, on_row: Callable[[list[StepRow]], None] | None = None,
                   ff_chunk_tokens: Sequence[int | None] = (None,),
                   guide_cache: Sequence[bool] = (True,), family: str = "flux1") -> list[StepRow]:
    """Every configuration at every size; bf16 first, then the model is converted to FP8 and measured again.
    ``on_row(rows)`` is called after every measurement (to save partial results of a long run).
    ``ff_chunk_tokens``: the hierarchical variants to measure (None: unchunked; N: feed-forward over N-token chunks);
    ``guide_cache``: with (True) and/or without (False) the guide cache, each combined with every chunk size.
    ``family``: the model family whose ``config`` architecture is measured (``ultragen.family``).
    (``config``, ``device`` and the geometry arguments exist for a CPU smoke run with a tiny model.)"""
    for chunk in ff_chunk_tokens:
        check_ff_chunk_tokens(chunk)  # before the model loads
    fam = family_named(family)
    if fam.name != "flux1" and any(ff_chunk_tokens):
        raise ValueError(f"--ff-chunk-tokens variants are measured for FLUX.1 only ({fam.title}'s hierarchical blocks "
                         f"run the feed-forward whole); leave the option out")
    model = fam.random_transformer(config, device=device,
                                   dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    rows: list[StepRow] = []
    reference: dict[str, torch.Tensor] = {}
    # bf16 first whatever the order given: FP8 converts the model in place, so a bf16 row after it would time FP8
    use = sorted({p == "fp8" for p in precisions})
    if True in use and fp8_unavailable():
        log(f"FP8 skipped: {fp8_unavailable()}")
        use = [u for u in use if not u]
    for use_fp8 in use:
        if use_fp8:
            log(f"FP8: converted {quantize_blocks_fp8(model)} linear layers")
        for compiled in compile_modes:
            hiers = {}
            # compiled blocks run the feed-forward whole (HierFluxTransformer), so chunk variants are eager-only
            chunks = [None] if compiled else list(ff_chunk_tokens)
            if compiled and any(ff_chunk_tokens):
                log("compiled: the feed-forward runs whole, so the chunk variants are measured eager only")
            for backend in backends:
                for chunk in chunks:
                    for cache in guide_cache:
                        hier = fam.hierarchical(model, backend=backend, ff_chunk_tokens=chunk, cache_guide=cache)
                        if compiled:
                            hier.compile_blocks()
                        hiers[backend, chunk, cache] = hier
            if compiled and dense:
                model.compile_repeated_blocks(dynamic=False)
            for size in sizes_px:
                name = f"{size}x{size}"
                for (backend, chunk, cache), hier in hiers.items():
                    label = dict(size=name, mode="hier", backend=backend, compile=compiled, fp8=use_fp8,
                                 ff_chunk_tokens=chunk, guide_cache=cache)
                    row, out = _measure(label, _hier_call(fam, hier, size, text_tokens, block_tokens, window_tokens), repeats, log)
                    if row is None:
                        continue
                    key = f"{name}/{backend}/{compiled}/{chunk}/{cache}"
                    if not use_fp8:
                        reference[key] = out.float().cpu()
                    elif key in reference:
                        ref = reference[key]
                        row = StepRow(**{**asdict(row), "rel_err_vs_bf16": float((out.float().cpu() - ref).norm() / ref.norm())})
                    rows.append(row)
                    hier.clear_guide_cache()
                    if on_row:
                        on_row(rows)
                if dense and (not compiled or size <= dense_compile_max_px):
                    label = dict(size=name, mode="dense", backend="cudnn", compile=compiled, fp8=use_fp8)
                    once = size >= 8192  # about 90 s a step: eager runs are timed cold, compiled ones once
                    dense_repeats = (1 if compiled else 0) if once else repeats
                    row, _ = _measure(label, _dense_call(fam, model, size, text_tokens, block_tokens, window_tokens),
                                      dense_repeats, log)
                    if row is not None:
                        rows.append(row)
                        if on_row:
                            on_row(rows)
            torch._dynamo.reset()
            if compiled and dense:  # undo the in-place block compilation before the next precision
                for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
                    block._compiled_call_impl = None
    return rows


def speedups(rows: Sequence[StepRow]) -> dict[str, dict]:
    """Per size: the best dense and the best hierarchical configuration and their ratio."""
    out = {}
    for size in sorted({r.size for r in rows}, key=lambda s: int(s.split("x")[0])):
        dense = [r for r in rows if r.size == size and r.mode == "dense"]
        hier = [r for r in rows if r.size == size and r.mode == "hier"]
        if dense and hier:
            best_d, best_h = min(dense, key=lambda r: r.s_per_step), min(hier, key=lambda r: r.s_per_step)
            out[size] = {"best_dense": asdict(best_d), "best_hier": asdict(best_h),
                         "speedup": best_d.s_per_step / best_h.s_per_step}
    return out
