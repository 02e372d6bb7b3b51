"""One guide-LoRA training step (forward, backward, AdamW) of the real FLUX.1-dev architecture with random weights.

``python -m ultragen.bench.train_step --size 1024`` writes ``bench/results/train-step-<gpu>-<yyyymmdd>.json``:
seconds per step (median of the timed steps after one warm-up step) and peak memory, with gradient checkpointing
(and, with ``--also-without-checkpointing``, without it, or "oom"). The step is the one ``ultragen train`` runs:
exact ``reference`` attention, bf16 weights, fp32 LoRA under bf16 autocast, loss on hires tokens only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ultragen.bench.models import random_flux
from ultragen.bench.record import result_path, write_result
from ultragen.flux import HierFluxTransformer
from ultragen.layout import make_layout
from ultragen.policy import build_plan
from ultragen.train.model import add_trainable_lora
from ultragen.train.objective import Noised, flow_loss


def random_batch(cfg, layout, device: torch.device, seed: int = 0) -> Noised:
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device)

    hires = (1, layout.hires_tokens, cfg.in_channels)
    return Noised(x_t=rand(*hires), target=rand(*hires), t=torch.full((1,), 0.7, device=device),
                  guide=rand(1, layout.guide_tokens, cfg.in_channels),
                  text=rand(1, layout.text_tokens, cfg.joint_attention_dim), pooled=rand(1, cfg.pooled_projection_dim))


def time_steps(hier, params, batch: Noised, plan, steps: int) -> dict:
    """Warm-up step, then ``steps`` timed steps; returns seconds per step and peak GB."""
    device = batch.x_t.device
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow_loss(hier, batch, plan, 1.0, device, torch.bfloat16)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return {"s_per_step": sorted(times)[len(times) // 2], "s_per_step_all": times,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "loss": float(loss.detach())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--also-without-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    start = time.perf_counter()
    transformer = random_flux(device="cuda")
    params = add_trainable_lora(transformer, args.rank, float(args.rank), "qkv")
    print(f"model built in {time.perf_counter() - start:.1f} s; {sum(p.numel() for p in params):,} LoRA parameters")
    layout = make_layout(args.size, args.size, pad=False)
    plan = build_plan(layout)
    hier = HierFluxTransformer(transformer, backend="reference", cache_guide=False)
    batch = random_batch(transformer.config, layout, device)
    hier.enable_gradient_checkpointing(True)
    row = {"size": f"{args.size}x{args.size}", "seq_tokens": layout.seq_tokens, "rank": args.rank,
           "targets": "qkv", "gradient_checkpointing": True, **time_steps(hier, params, batch, plan, args.steps)}
    print(json.dumps(row), flush=True)
    record = {"model": "FLUX.1-dev architecture, random bf16 weights, guide LoRA fp32 (AdamW)",
              "attention_backend": "reference", "batch": 1, **row}
    if args.also_without_checkpointing:
        hier.enable_gradient_checkpointing(False)
        torch.cuda.empty_cache()
        try:
            without = time_steps(hier, params, batch, plan, args.steps)
        except torch.OutOfMemoryError:
            without = "oom"
        record["without_checkpointing"] = without
        print(json.dumps({"without_checkpointing": without}), flush=True)
    print(f"wrote {write_result(result_path('train-step', args.out), record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
