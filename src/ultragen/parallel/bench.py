"""``ultragen bench step --parallel MODE``: seconds per hierarchical step over the GPUs of one torchrun launch.

Every rank builds the same random-weight FLUX.1-dev (``ultragen.bench.models``), inputs broadcast from rank 0. Per
size and configuration: the one-GPU step (each rank runs the whole step alone, all at once: no traffic), the sharded
step, and the sharded step again with every collective timed (device synchronised around each, so its total is
the communication time without overlap). A row holds the busiest rank's numbers: step time, speedup over one GPU and
scaling efficiency (speedup / GPUs), communication seconds and bytes per step (:func:`step_traffic`), peak memory,
and the sharded output's relative L2 error against the one-GPU output (exactness on the device).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ultragen.bench.models import FLUX1_DEV, random_flux, random_inputs
from ultragen.bench.step import median_s
from ultragen.flux import HierFluxTransformer
from ultragen.flux.fp8 import fp8_unavailable, quantize_blocks_fp8
from ultragen.layout import make_layout
from ultragen.parallel.context import ParallelMode, ProcessGroupContext, parse_parallel_mode
from ultragen.parallel.sequence import SequenceParallel
from ultragen.parallel.traffic import step_traffic
from ultragen.policy import build_plan


@dataclass(frozen=True)
class ParallelStepRow:
    size: str
    gpus: int
    parallel: str  # ulysses | halo
    backend: str
    compile: bool
    fp8: bool
    s_per_step: float  # sharded step, slowest rank
    one_gpu_s_per_step: float  # the whole step on one GPU (slowest rank); NaN if it does not fit one GPU
    speedup: float  # one_gpu_s_per_step / s_per_step
    scaling_efficiency: float  # speedup / gpus
    comm_s_per_step: float  # time inside collectives per step (timed run, busiest rank)
    bytes_per_step: int  # sent by the busiest rank per step
    peak_gb: float  # largest peak over the ranks, sharded step
    rel_err_vs_one_gpu: float  # ||sharded - one GPU|| / ||one GPU|| (largest over ranks)


def _max(comm: ProcessGroupContext, value: float) -> float:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=comm.group)
    return float(t.item())


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


def measure_row(comm: ProcessGroupContext, model, size_px: int, mode: ParallelMode, backend: str, compiled: bool,
                fp8: bool, repeats: int, text_tokens: int, block_tokens: int, window_tokens: int) -> ParallelStepRow:
    """One row: the configuration on one GPU, sharded, and sharded with timed collectives."""
    layout = make_layout(size_px, size_px, text_tokens=text_tokens, block_tokens=block_tokens,
                         window_tokens=window_tokens)
    plan = build_plan(layout)
    inputs = random_inputs(model, layout.hires_tokens, layout.guide_tokens, text_tokens)
    inputs = {k: v if v is None else comm.broadcast(v.contiguous()) for k, v in inputs.items()}
    parallel = SequenceParallel(comm, mode)
    one, sharded = (HierFluxTransformer(model, backend=backend, parallel=p) for p in (None, parallel))
    if compiled:
        one.compile_blocks()
        sharded.compile_blocks()

    def step(hier):
        with torch.no_grad():
            return hier(plan=plan, **inputs)

    try:  # 16K may not fit one GPU: the row then has no one-GPU time (NaN), the sharded step is still measured
        one_s, reference = median_s(lambda: step(one), repeats)
        reference = reference.float().cpu()
    except torch.OutOfMemoryError:
        one_s, reference = float("nan"), None
    one.clear_guide_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = comm.bytes_sent
    step_s, out = median_s(lambda: step(sharded), repeats)
    peak = _peak_gb()
    sent = (comm.bytes_sent - before) // (repeats + 1 if repeats else 1)  # per step (median_s warms up once)
    comm.timed, comm.comm_s = True, 0.0
    step(sharded)
    comm.timed = False
    sharded.clear_guide_cache()
    err = float("nan") if reference is None else float((out.float().cpu() - reference).norm() / reference.norm())
    one_s, step_s, comm_s = _max(comm, one_s), _max(comm, step_s), _max(comm, comm.comm_s)
    cfg = model.config
    traffic = step_traffic(plan, comm.world, mode, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
                           layers=cfg.num_layers + cfg.num_single_layers, out_channels=cfg.in_channels,
                           elem_bytes=torch.finfo(model.dtype).bits // 8)
    if sent != traffic.per_rank_bytes[comm.rank]:
        raise RuntimeError(f"rank {comm.rank} sent {sent} bytes per step, the traffic count says "
                           f"{traffic.per_rank_bytes[comm.rank]}; report this as a bug")
    return ParallelStepRow(
        size=f"{size_px}x{size_px}", gpus=comm.world, parallel=mode.value, backend=backend, compile=compiled, fp8=fp8,
        s_per_step=step_s, one_gpu_s_per_step=one_s, speedup=one_s / step_s,
        scaling_efficiency=one_s / step_s / comm.world, comm_s_per_step=comm_s,
        bytes_per_step=traffic.max_rank_bytes, peak_gb=_max(comm, peak), rel_err_vs_one_gpu=_max(comm, err),
    )


def _describe(row: ParallelStepRow) -> str:
    return (f"{row.size:>11} {row.gpus} GPUs {row.parallel:<7} {row.backend:<7} compile={row.compile!s:<5} "
            f"fp8={row.fp8!s:<5} {row.s_per_step:7.3f} s (1 GPU {row.one_gpu_s_per_step:.3f} s, x{row.speedup:.2f}, "
            f"eff {row.scaling_efficiency:.0%}) comm {row.comm_s_per_step:.3f} s {row.bytes_per_step / 1e9:.2f} GB  "
            f"{row.peak_gb:.1f} GB  err {row.rel_err_vs_one_gpu:.1e}")


def run_parallel_step_bench(comm: ProcessGroupContext, sizes_px: Sequence[int], modes: Sequence[str],
                            backends: Sequence[str], compile_modes: Sequence[bool] = (False, True),
                            precisions: Sequence[str] = ("bf16", "fp8"), repeats: int = 2, log=print,
                            config: dict = FLUX1_DEV, device: str = "cuda", text_tokens: int = 512,
                            block_tokens: int = 128, window_tokens: int = 16,
                            on_row: Callable[[list[ParallelStepRow]], None] | None = None) -> list[ParallelStepRow]:
    """Every (precision, compile mode, size, mode, backend) row; bf16 first, then the model converted to FP8.
    (``config``, ``device`` and the geometry arguments exist for a CPU smoke run with a tiny model.)"""
    modes = [parse_parallel_mode(m) for m in modes]
    model = random_flux(config, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
    use = [p == "fp8" for p in precisions]
    if True in use and fp8_unavailable():
        log(f"FP8 skipped: {fp8_unavailable()}")
        use = [u for u in use if not u]
    rows: list[ParallelStepRow] = []
    for use_fp8 in use:
        if use_fp8:
            quantize_blocks_fp8(model)
        for compiled in compile_modes:
            for size in sizes_px:
                for mode in modes:
                    for backend in backends:
                        row = measure_row(comm, model, size, mode, backend, compiled, use_fp8, repeats, text_tokens,
                                          block_tokens, window_tokens)
                        rows.append(row)
                        log(_describe(row))
                        if on_row:
                            on_row(rows)
            torch._dynamo.reset()
    return rows


def run_bench_step_parallel(args: argparse.Namespace) -> int:
    """``ultragen bench step --parallel ...`` on this torchrun process; rank 0 writes the JSON (after every row)."""
    from ultragen.bench.record import result_path, write_result
    from ultragen.parallel.launch import fail_together, join_group, quiet_other_ranks

    quiet_other_ranks()
    comm = join_group()
    path = args.out or result_path(f"step-parallel-{comm.world}gpu")

    def save(rows) -> None:
        if comm.rank == 0:
            write_result(path, {"rows": [asdict(r) for r in rows]})

    with fail_together(comm, "ultragen bench step"):
        run_parallel_step_bench(comm, args.sizes, args.parallel, args.backends,
                                [mode == "compiled" for mode in args.compile], precisions=args.precisions,
                                on_row=save, log=print if comm.rank == 0 else (lambda _line: None),
                                device=f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        if comm.rank == 0:
            print(f"wrote {path}")
        torch.distributed.destroy_process_group()
    return 0
