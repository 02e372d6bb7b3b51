"""Compiled FP8 4K step (and its warm-up) under inductor options, each a fresh compile in one process:

    PYTHONPATH=src:bench python bench/gpu_compile_options.py hier:default hier:coord dense:coord

Variants: default, pointwise (max_autotune_pointwise), coord (coordinate_descent_tuning). Prints warm-up seconds
and the median step (CUDA events). Results: bench/results/compile-options-*.json."""

import sys
import time

import torch

from ultragen.bench.attention import median_ms
from ultragen.bench.models import random_flux
from ultragen.bench.step import _dense_call, _hier_call
from ultragen.flux import HierFluxTransformer
from ultragen.flux.fp8 import quantize_blocks_fp8

VARIANTS = {"default": {}, "pointwise": {"max_autotune_pointwise": True}, "coord": {"coordinate_descent_tuning": True}}


def warm_and_median_ms(call, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, which compiles; median CUDA-event ms of at least ``repeats`` calls after
    one more)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    warm = time.perf_counter() - start
    # steps of over 400 ms (the 4K and 8K ones) get exactly ``repeats`` runs from median_ms's time budget
    return warm, median_ms(lambda _: call(), 1, warmup=1, min_runs=repeats)


def main(names: list[str]) -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    model = random_flux(device="cuda", dtype=torch.bfloat16)
    quantize_blocks_fp8(model)
    for name in names:
        mode, variant = name.split(":")
        torch._dynamo.reset()
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            block._compiled_call_impl = None  # undo the previous variant's in-place compile
        options = VARIANTS[variant]
        if mode == "hier":
            hier = HierFluxTransformer(model, backend="triton")
            hier.compile_blocks(options=options)
            warm, ms = warm_and_median_ms(_hier_call(hier, 4096, 512, 128, 16), 5)
        else:
            model.compile_repeated_blocks(dynamic=False, options=options)
            warm, ms = warm_and_median_ms(_dense_call(model, 4096, 512, 128, 16), 2)
        print(f"{mode:5} {variant:10} warm-up {warm:6.1f} s   step {ms:8.1f} ms", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
