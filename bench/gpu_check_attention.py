"""One GPU call for the attention backends: smoke checks, a kernel-config sweep, the benchmark, the GPU tests.

    PYTHONPATH=src STAGES=smoke,sweep,by_size,bench,tests python bench/gpu_check_attention.py

Writes under $OUT (or bench/results/tmp): sweep.json, by-size.json, attention-<gpu>-<date>.json, pytest.log.
The benchmark and the tests use the defaults of ultragen.attention.triton_bsa; the sweep prints the best configs
to set them from (the best SWEEP_8K of them at 4K, default 3, are also timed at 8K and the winner is picked among
those). Prints a short table last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_attention_backends import _plan, _qkv, gathered_attention  # noqa: E402

from ultragen.attention import triton_bsa  # noqa: E402
from ultragen.attention.triton_bsa import KernelConfig, triton_attention, triton_int8_attention  # noqa: E402
from ultragen.bench import attention as bench  # noqa: E402
from ultragen.bench.record import environment  # noqa: E402

OUT = Path(os.environ.get("OUT", "bench/results/tmp"))
STAGES = os.environ.get("STAGES", "smoke,sweep,bench,tests").split(",")
DEADLINE = time.time() + float(os.environ.get("BUDGET_S", "570"))
SUMMARY: list[str] = []


def log(line: str) -> None:
    print(line, flush=True)


def left() -> float:
    return DEADLINE - time.time()


def accuracy(config: KernelConfig, int8: bool, size: str = "2048x2048", dim: int = 128) -> float:
    """bf16: max err / bf16-SDPA max err; int8: min per-head cosine with a K offset of 30."""
    plan = _plan(size)
    q, k, v = _qkv(plan, heads=2, dim=dim, device="cuda", seed=11, k_offset=30.0 if int8 else 0.0)
    exact = gathered_attention(q, k, v, plan)
    out = torch.full_like(q, float("nan"))
    (triton_int8_attention if int8 else triton_attention)(q, k, v, plan, config, out=out)
    out = out.float()
    if int8:
        return F.cosine_similarity(out.flatten(2), exact.flatten(2), dim=-1).min().item()
    noise = (gathered_attention(q, k, v, plan, torch.bfloat16).float() - exact).abs().max().item()
    return (out - exact).abs().max().item() / noise


def smoke() -> None:
    for config in (KernelConfig(), KernelConfig(use_tma=True), KernelConfig(block_n=128), KernelConfig(q_split=True)):
        for dim in (128, 64):
            try:
                log(f"smoke triton {config} d{dim}: err/noise {accuracy(config, False, dim=dim):.3f}")
            except Exception as error:  # noqa: BLE001 - report every failing variant, keep going
                log(f"smoke triton {config} d{dim}: FAILED {type(error).__name__}: {str(error)[-1500:]}")
    for config in (KernelConfig(v_fp8=True), KernelConfig(v_fp8=False), KernelConfig(block_n=64, q_split=True)):
        try:
            log(f"smoke int8 {config}: cos {accuracy(config, True):.5f}")
        except Exception as error:  # noqa: BLE001
            log(f"smoke int8 {config}: FAILED {type(error).__name__}: {str(error)[:400]}")


def sweep() -> dict:
    # The broad sweeps (bench/results/attention-sweep-*.json) put 4 warps and 64-key tiles ahead; this one compares
    # the split-query programs and the int8 kernel's integer-add conversion against those, at 4K and 8K.
    variants = {
        "bf16": [KernelConfig(64, 4, 2), KernelConfig(64, 4, 3, use_tma=True)]
        + [KernelConfig(n, w, s, q_split=True) for n, w, s in ((64, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 3))],
        "int8": [KernelConfig(n, w, s) for n, w, s in ((128, 4, 2), (64, 4, 2), (64, 4, 3), (128, 8, 2))]
        + [KernelConfig(n, w, s, q_split=True) for n, w, s in ((64, 4, 2), (64, 4, 3), (128, 4, 2))]
        + [KernelConfig(64, 4, 2, v_fp8=False, q_split=True)],
    }
    results: dict = {"bf16": [], "int8": []}
    for name, configs in variants.items():
        fn = triton_int8_attention if name == "int8" else triton_attention
        for config in configs:
            if left() < 240:
                log("sweep: out of time, stopping")
                break
            entry = {"config": asdict(config)}
            try:
                entry["accuracy"] = accuracy(config, name == "int8")
                row = bench.bench_sparse("4096x4096", name, fn=lambda q, k, v, p, c=config, f=fn: f(q, k, v, p, c))
                entry["ms_4k"] = row.ms
                entry["tflops_4k"] = row.tflops
            except Exception as error:  # noqa: BLE001
                entry["error"] = f"{type(error).__name__}: {str(error)[-300:]}"
            log(f"sweep {name} {entry}")
            results[name].append(entry)
            torch.cuda.empty_cache()
    for name, entries in list(results.items()):
        ok = [e for e in entries if "ms_4k" in e and (e["accuracy"] >= 0.999 if name == "int8" else e["accuracy"] <= 2)]
        ok.sort(key=lambda e: e["ms_4k"])
        at_8k = ok[: int(os.environ.get("SWEEP_8K", "3"))]
        for e in at_8k:
            if left() < 200:
                break
            config = KernelConfig(**e["config"])
            fn = triton_int8_attention if name == "int8" else triton_attention
            e["ms_8k"] = bench.bench_sparse("8192x8192", name, fn=lambda q, k, v, p, c=config, f=fn: f(q, k, v, p, c)).ms
            log(f"sweep 8k {name} {e}")
        if ok:
            best = min(at_8k, key=lambda e: (e.get("ms_8k", float("inf")), e["ms_4k"]))
            results[f"best_{name}"] = best["config"]
            SUMMARY.append(f"best {name}: {best} (defaults: {triton_bsa.DEFAULT_CONFIGS[(name, 128)]})")
    (OUT / "sweep.json").write_text(json.dumps({**environment(), **results}, indent=1))
    return results


def by_size() -> None:
    """Whole-block vs split-query programs at every benchmark size (the sweep above ranks them at 4K and 8K)."""
    variants = {
        "bf16": [KernelConfig(64, 4, 2, q_split=True), KernelConfig(64, 4, 2), KernelConfig(64, 4, 3)],
        "int8": [KernelConfig(128, 4, 2, q_split=True), KernelConfig(64, 4, 3), KernelConfig(64, 4, 3, q_split=True)],
    }
    rows = []
    for size in os.environ.get("BENCH_SIZES", ",".join(bench.SIZES)).split(","):
        for name, configs in variants.items():
            fn = triton_int8_attention if name == "int8" else triton_attention
            for config in [*configs, configs[0]]:  # the first again last: the drift within the size
                if left() < 60:
                    break
                ms = bench.bench_sparse(size, name, fn=lambda q, k, v, p, c=config, f=fn: f(q, k, v, p, c)).ms
                rows.append({"size": size, "variant": name, "config": asdict(config), "ms": ms})
                log(f"by_size {size} {name} {config}: {ms:.3f} ms")
            torch.cuda.empty_cache()
    (OUT / "by-size.json").write_text(json.dumps({**environment(), "rows": rows}, indent=1) + "\n")


def run_bench() -> None:
    rows = []
    sizes = os.environ.get("BENCH_SIZES", ",".join(bench.SIZES)).split(",")  # e.g. the target sizes first
    for size in sizes:
        if left() < 60:
            log(f"bench: out of time before {size}")
            break
        rows += bench.run([size], log=log)
    path = bench.write_results(rows, OUT / bench.results_path(".").name)
    record = json.loads(path.read_text())
    record["configs"] = {f"{k[0]}-d{k[1]}": asdict(v) for k, v in triton_bsa.DEFAULT_CONFIGS.items()}
    path.write_text(json.dumps(record, indent=1) + "\n")
    SUMMARY.append(bench.format_table(rows))


def run_tests() -> None:
    timeout = max(30, int(left()) - 10)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_attention_backends.py", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text = done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        text = f"pytest timed out after {timeout} s\n{error.stdout or ''}"
    (OUT / "pytest.log").write_text(text)
    tail = [line for line in text.splitlines() if "passed" in line or "failed" in line or line.startswith("FAILED")]
    SUMMARY.append("pytest -m gpu: " + " | ".join(tail[-12:]))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    import triton

    log(f"{torch.cuda.get_device_name(0)} torch {torch.__version__} triton {triton.__version__} stages {STAGES}")
    stages = {"smoke": smoke, "sweep": sweep, "by_size": by_size, "bench": run_bench, "tests": run_tests}
    for stage in STAGES:
        start = time.time()
        stages[stage]()
        log(f"== stage {stage}: {time.time() - start:.0f} s, {left():.0f} s left")
    log("\n".join(SUMMARY))


if __name__ == "__main__":
    main()
