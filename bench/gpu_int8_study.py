"""One GPU study of the int8 backend's costs: the K/V quantization pre-pass alone, and the kernel's int32 -> fp32
conversion of the scores (integer add of 1.5 * 2^23, as shipped, vs the conversion instruction followed by a float
add of the same offset, which also changes register use), same process.

    PYTHONPATH=src python bench/gpu_int8_study.py    # writes $OUT/int8-study.json
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

import ultragen.attention
from ultragen.attention import triton_bsa, triton_kernels
from ultragen.attention.triton_bsa import KernelConfig, quantize_kv, triton_attention, triton_int8_attention
from ultragen.bench import attention as bench
from ultragen.bench.record import environment

SHIPPED = "    f = (s + 0x4B400000).to(tl.float32, bitcast=True)\n"
CONVERT = "    f = s.to(tl.float32) + 12582912.0\n"


def converting_kernels():
    """A copy of the kernel module whose int8 kernel converts the scores with the conversion instruction."""
    source = Path(triton_kernels.__file__).read_text()
    assert SHIPPED in source, "the shipped integer-add line moved; update this study"
    path = Path(tempfile.mkdtemp()) / "triton_kernels_convert.py"
    path.write_text(source.replace(SHIPPED, CONVERT))
    spec = importlib.util.spec_from_file_location("triton_kernels_convert", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    out = Path(os.environ.get("OUT", "bench/results/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    record = {**environment(), "rows": []}
    convert = converting_kernels()
    configs = [KernelConfig(128, 4, 2, q_split=True), KernelConfig(64, 4, 3)]
    for size in ("4096x4096", "8192x8192"):
        plan = bench.plan_for(size, 512)
        sets = bench.input_sets((1, 24, plan.layout.seq_tokens, 128), torch.bfloat16)
        prepass = bench.median_ms(lambda i: quantize_kv(sets[i][1], sets[i][2], plan), len(sets))
        bf16 = bench.median_ms(lambda i: triton_attention(*sets[i], plan), len(sets))
        row = {"size": size, "prepass_ms": prepass, "bf16_default_ms": bf16, "int8": []}
        for config in configs:
            entry = {"config": asdict(config)}
            for name, module in (("integer_add", triton_kernels), ("convert", convert)):
                ultragen.attention.triton_kernels = module
                sys.modules["ultragen.attention.triton_kernels"] = module
                try:
                    entry[f"{name}_ms"] = bench.median_ms(
                        lambda i, c=config: triton_int8_attention(*sets[i], plan, c), len(sets))
                finally:
                    ultragen.attention.triton_kernels = triton_kernels
                    sys.modules["ultragen.attention.triton_kernels"] = triton_kernels
            row["int8"].append(entry)
        print(json.dumps(row), flush=True)
        record["rows"].append(row)
    record["defaults"] = {f"{k[0]}-d{k[1]}": asdict(v) for k, v in triton_bsa.DEFAULT_CONFIGS.items()}
    (out / "int8-study.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
