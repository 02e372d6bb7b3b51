"""Compiled FP8 hierarchical step with GELU-tanh as F.gelu vs x * sigmoid(2u) (``blocks.SIGMOID_GELU``), alternating,
at 4K and 8K, plus the relative difference of the outputs:

    PYTHONPATH=src:bench python bench/gpu_gelu_form.py

Results: bench/results/compile-options-*.json (gelu_form)."""

import torch
from gpu_compile_options import warm_and_median_ms

import ultragen.flux.blocks as blocks
from ultragen.bench.models import random_flux
from ultragen.bench.step import _hier_call
from ultragen.flux import HierFluxTransformer
from ultragen.flux.fp8 import quantize_blocks_fp8


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    model = random_flux(device="cuda", dtype=torch.bfloat16)
    quantize_blocks_fp8(model)
    for size in (4096, 8192):
        outs = {}
        for sigmoid in (False, True, False, True) if size == 4096 else (False, True):
            blocks.SIGMOID_GELU = sigmoid
            torch._dynamo.reset()
            hier = HierFluxTransformer(model, backend="triton")
            hier.compile_blocks()
            call = _hier_call(hier, size, 512, 128, 16)  # the same seeded inputs every time
            warm, ms = warm_and_median_ms(call, 4 if size == 4096 else 2)
            outs[sigmoid] = call().float()
            print(f"{size} sigmoid_gelu={sigmoid!s:5} warm-up {warm:5.1f} s  step {ms:8.1f} ms", flush=True)
        diff = float((outs[False] - outs[True]).norm() / outs[False].norm())
        print(size, "relative difference, sigmoid vs tanh form", diff, flush=True)


if __name__ == "__main__":
    main()
