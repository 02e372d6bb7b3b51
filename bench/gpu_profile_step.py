"""GPU kernel time of one compiled FP8 hierarchical step by kernel, and by kind:

    PYTHONPATH=src:bench python bench/gpu_profile_step.py 4096

Kernels whose inductor name mentions _scaled_mm are the activation quantisation fused into elementwise work; the
rough split counts them as GEMM, the table below it names them. Results: bench/results/compile-options-*.json."""

import collections
import sys

import torch
from gpu_compile_options import warm_and_median_ms
from torch.profiler import ProfilerActivity, profile

from ultragen.bench.models import random_flux
from ultragen.bench.step import _hier_call
from ultragen.flux import HierFluxTransformer
from ultragen.flux.fp8 import quantize_blocks_fp8


def kind(kernel: str) -> str:
    name = kernel.lower()
    if any(s in name for s in ("gemm", "scaled_mm", "cutlass", "sm90", "nvjet", "matmul")):
        return "gemm"
    return "attention" if name.startswith("bsa_") or "flash" in name or "fmha" in name else "other"


def main(size_px: int) -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    model = random_flux(device="cuda", dtype=torch.bfloat16)
    quantize_blocks_fp8(model)
    hier = HierFluxTransformer(model, backend="triton")
    hier.compile_blocks()
    call = _hier_call(hier, size_px, 512, 128, 16)
    warm, ms = warm_and_median_ms(call, 1)
    print(f"warm-up {warm:.1f} s, step {ms:.1f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        call()
        torch.cuda.synchronize()
    totals, counts = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / 1e3
            counts[event.name] += 1
    kinds = collections.Counter()
    for name, t in totals.items():
        kinds[kind(name)] += t
    print("ms by kind:", {k: round(v, 1) for k, v in kinds.items()}, "sum", round(sum(kinds.values()), 1))
    for name, t in totals.most_common(45):
        print(f"{t:9.2f} ms {counts[name]:5d}x  {name[:150]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
