"""FP8 matmuls for the FLUX blocks: torchao float8 weights with dynamically scaled (per-row) activations."""

from __future__ import annotations

import torch
from torch import nn


def fp8_unavailable() -> str | None:
    """None when FP8 linears can run here, else why not."""
    if not torch.cuda.is_available():
        return "FP8 linears need a CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"FP8 linears need compute capability 8.9+ (Ada, Hopper), this GPU has {torch.cuda.get_device_capability()}"
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        return "FP8 linears need torchao: pip install 'ultragen[fp8]'"
    return None


def quantize_blocks_fp8(transformer: nn.Module) -> int:
    """Swap every nn.Linear inside the transformer blocks for FP8 (e4m3) weights and per-row dynamically scaled FP8
    activations, in place; embedders and the output projection stay bf16. Returns the number of layers converted.
    Do this before adding LoRA adapters."""
    if reason := fp8_unavailable():
        raise RuntimeError(reason)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    converted = []

    def wanted(module: nn.Module, name: str) -> bool:
        hit = isinstance(module, nn.Linear) and "transformer_blocks." in name
        if hit:
            converted.append(name)
        return hit

    # set_inductor_config=False: torchao's default switches on inductor's coordinate-descent tuning (and float32
    # matmul precision "high") for the whole process. On an H100 it made the first (compiling) FP8 4K image take 516 s
    # instead of 57 s, for a step 1 % faster (bench/results/compile-options-nvidia-h100-80gb-hbm3-20261122.json)
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config, filter_fn=wanted)
    return len(converted)
