"""``ultragen bench attention``: dense cuDNN / FlashAttention-2 SDPA against the block-sparse backends.

FLUX shapes: batch 1, 24 heads of 128, bf16, 512 text tokens. Dense rows run SDPA over the plain FLUX sequence
(text + H/16 * W/16 image tokens, no guide, no padding); sparse rows run each backend on the default plan of the
hierarchical layout. Times are CUDA-event medians after warm-up, rotating input sets when they would fit in L2.
``tflops`` counts only the FLOPs that are computed (dense: all of the plain sequence; sparse: the plan's blocks);
``flop_reduction`` is the dense FLOPs over the row's FLOPs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ultragen.bench.record import result_path, write_result
from ultragen.layout import make_layout
from ultragen.policy import AttentionPlan, build_plan

SIZES = ("1024x1024", "2048x2048", "4096x4096", "8192x8192", "4096x2048", "3840x2160")
DENSE_BACKENDS = ("cudnn", "flash")
SPARSE_BACKENDS = ("flex", "triton", "triton-int8")


@dataclass(frozen=True)
class Row:
    size: str  # width x height in pixels
    backend: str
    ms: float
    tflops: float
    flop_reduction: float


def parse_size(size: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' in pixels -> (width, height)."""
    try:
        width, height = (int(part) for part in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {size!r} is not WIDTHxHEIGHT in pixels, e.g. 4096x4096 or 3840x2160") from None
    return width, height


def plan_for(size: str, text_tokens: int = 512) -> AttentionPlan:
    width, height = parse_size(size)
    return build_plan(make_layout(height, width, text_tokens=text_tokens), "default")


def median_ms(fn: Callable[[int], object], n_inputs: int, warmup: int = 2, min_runs: int = 5,
              budget_ms: float = 400.0) -> float:
    """Median CUDA-event time of ``fn(i)`` (i cycles over ``n_inputs`` input sets), after ``warmup`` calls."""
    for i in range(warmup):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    times: list[float] = []
    runs = min_runs
    i = 0
    while i < runs:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % n_inputs)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
        if i == 0:  # as many runs as fit the budget, between min_runs and 50
            runs = max(min_runs, min(50, int(budget_ms / max(times[0], 1e-3))))
        i += 1
    return statistics.median(times)


def input_sets(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Random (q, k, v) sets; several when one set would sit in L2 across runs."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    one_set = 3 * math.prod(shape) * torch.finfo(dtype).bits // 8
    count = 1 if one_set > 2 * l2 else 4
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [tuple(torch.randn(shape, generator=gen, device="cuda", dtype=dtype) for _ in range(3))
            for _ in range(count)]


def bench_dense(size: str, backend: str, heads: int = 24, head_dim: int = 128, text_tokens: int = 512) -> Row:
    """Dense SDPA over the plain FLUX sequence through cuDNN or FlashAttention-2."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    width, height = parse_size(size)
    n = text_tokens + (height // 16) * (width // 16)
    flops = 4 * heads * head_dim * n * n
    kernel = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    sets = input_sets((1, heads, n, head_dim), torch.bfloat16)
    with sdpa_kernel(kernel):
        ms = median_ms(lambda i: torch.nn.functional.scaled_dot_product_attention(*sets[i]), len(sets))
    return Row(size, backend, ms, flops / ms / 1e9, 1.0)


def bench_sparse(size: str, backend: str, heads: int = 24, head_dim: int = 128, text_tokens: int = 512,
                 fn: Callable | None = None) -> Row:
    """One block-sparse backend on the default plan; ``fn(q, k, v, plan)`` overrides the backend call."""
    from ultragen.attention import attend

    plan = plan_for(size, text_tokens)
    call = fn or (lambda q, k, v, p: attend(q, k, v, p, backend))
    sets = input_sets((1, heads, plan.layout.seq_tokens, head_dim), torch.bfloat16)
    ms = median_ms(lambda i: call(*sets[i], plan), len(sets))
    flops = plan.attention_flops(heads, head_dim)
    return Row(size, backend, ms, flops / ms / 1e9, plan.dense_flops(heads, head_dim) / flops)


def run(sizes: Sequence[str] = SIZES, backends: Sequence[str] = DENSE_BACKENDS + SPARSE_BACKENDS,
        log: Callable[[str], None] = print) -> list[Row]:
    """Every backend at every size, in one process; a backend that fails is logged and left out."""
    rows = []
    for size in sizes:
        for backend in backends:
            try:
                row = (bench_dense if backend in DENSE_BACKENDS else bench_sparse)(size, backend)
            except Exception as error:  # noqa: BLE001 - a failing backend is reported, the others still run
                log(f"{size} {backend}: failed: {type(error).__name__}: {str(error)[:300]}")
                continue
            finally:
                torch.cuda.empty_cache()
            log(f"{row.size:>10} {row.backend:<12} {row.ms:9.3f} ms {row.tflops:7.1f} TFLOP/s x{row.flop_reduction:.1f}")
            rows.append(row)
    return rows


def results_path(directory: str | Path = "bench/results") -> Path:
    return result_path("attention", directory)


def write_results(rows: Sequence[Row], path: str | Path) -> Path:
    return write_result(path, {"rows": [asdict(r) for r in rows]})


def format_table(rows: Sequence[Row]) -> str:
    """One line per row, plus each sparse backend's share of dense cuDNN TFLOP/s at the same size."""
    cudnn = {r.size: r.tflops for r in rows if r.backend == "cudnn"}
    lines = [f"{'size':>10} {'backend':<12} {'ms':>9} {'TFLOP/s':>8} {'FLOP cut':>8} {'of cuDNN':>8}"]
    for r in rows:
        share = f"{r.tflops / cudnn[r.size]:8.0%}" if r.size in cudnn else " " * 8
        lines.append(f"{r.size:>10} {r.backend:<12} {r.ms:9.3f} {r.tflops:8.1f} {r.flop_reduction:7.1f}x {share}")
    return "\n".join(lines)
