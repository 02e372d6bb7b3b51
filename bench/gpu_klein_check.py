"""GPU study (not a test): the hierarchical FLUX.2 [klein] transformer at the real klein-4B / klein-9B shapes with
random bf16 weights. Checks it against the stock diffusers model where both can be compared (dense plan, one window,
no guide, 1K) and times stock dense vs hierarchical steps, eager and compiled, at the sizes in KLEIN_SIZES.

    python bench/gpu_klein_check.py OUT.json        (KLEIN_MODELS=klein-4b,klein-9b KLEIN_SIZES=2048,4096)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from diffusers import Flux2Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from ultragen.flux2 import HierFlux2Transformer
from ultragen.layout import make_layout
from ultragen.policy import build_plan

COMMON = dict(patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256, mlp_ratio=3.0,
              axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
CONFIGS = {
    "klein-4b": dict(COMMON, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680),
    "klein-9b": dict(COMMON, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288),
}
TEXT = 512


def build(config: dict) -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Flux2Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # diffusers zero-initialises some projections; random everywhere makes every path count
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1) + (0 if p.dim() > 1 else 1))
    return model.eval().requires_grad_(False)


def raster_ids(rows: int, cols: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    z = torch.zeros_like(r)
    return torch.stack([z, r, c, z], -1).reshape(-1, 4).float().cuda()


def text_ids() -> torch.Tensor:
    ids = torch.zeros(TEXT, 4)
    ids[:, 3] = torch.arange(TEXT)
    return ids.cuda()


def timed(fn, repeats: int = 3) -> tuple[float, torch.Tensor]:
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2], out


def stock_step(model, rows, cols, x, text, t):
    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return model(hidden_states=x, encoder_hidden_states=text, timestep=t, img_ids=raster_ids(rows, cols),
                         txt_ids=text_ids()).sample
    return run


def main(path: str) -> None:
    rows_out = []
    models = os.environ.get("KLEIN_MODELS", "klein-4b,klein-9b").split(",")
    sizes = [int(s) for s in os.environ.get("KLEIN_SIZES", "2048,4096").split(",")]
    for name in models:
        model = build(CONFIGS[name])
        cfg = model.config
        g = torch.Generator("cuda").manual_seed(1)
        # exactness at 1K: dense plan over one window, no guide, vs the stock model (bf16 both; fp32 reference)
        layout = make_layout(1024, 1024, window_tokens=64, rho=None, text_tokens=TEXT)
        x = torch.randn(1, layout.hires_tokens, cfg.in_channels, device="cuda", dtype=torch.bfloat16, generator=g)
        text = torch.randn(1, TEXT, cfg.joint_attention_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        t = torch.full((1,), 0.7, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            stock = stock_step(model, 64, 64, x, text, t)().float()
            hier = HierFlux2Transformer(model, backend="triton")
            plan = build_plan(layout, "dense")
            out = layout.hires_to_raster(hier(layout.hires_to_sequence(x), text, t, plan)).float()
        err = ((out - stock).norm() / stock.norm()).item()
        print(f"{name}: 1K dense-plan hierarchical vs stock (bf16): rel L2 {err:.2e}", flush=True)
        rows_out.append({"model": name, "check": "dense_plan_vs_stock_1k", "rel_l2": err})
        for compiled in (False, True):
            hier = HierFlux2Transformer(model, backend="triton")
            if compiled:
                hier.compile_blocks()
            for px in sizes:
                layout = make_layout(px, px, rho=4, text_tokens=TEXT)
                plan = build_plan(layout, "default")
                x = torch.randn(1, layout.hires_tokens, cfg.in_channels, device="cuda", dtype=torch.bfloat16)
                guide = torch.randn(1, layout.guide_tokens, cfg.in_channels, device="cuda", dtype=torch.bfloat16)
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                with torch.no_grad():
                    s, _ = timed(lambda: hier(x, text, t, plan, guide=guide))
                peak = torch.cuda.max_memory_allocated() / 1e9
                row = {"model": name, "size": px, "mode": "hier", "backend": "triton", "compile": compiled,
                       "s_per_step": s, "peak_gb": peak, "wall_incl_warmup_s": time.perf_counter() - start}
                print(row, flush=True)
                rows_out.append(row)
                hier.clear_guide_cache()
        for px in sizes:
            if px > 4096:
                continue
            rows, cols = px // 16, px // 16
            x = torch.randn(1, rows * cols, cfg.in_channels, device="cuda", dtype=torch.bfloat16)
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                s, _ = timed(stock_step(model, rows, cols, x, text, t), repeats=1 if px >= 4096 else 3)
            row = {"model": name, "size": px, "mode": "dense", "backend": "cudnn", "compile": False, "s_per_step": s,
                   "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
            print(row, flush=True)
            rows_out.append(row)
        del model, hier
        torch.cuda.empty_cache()
    import datetime

    import diffusers
    import triton

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "diffusers": diffusers.__version__, "date": datetime.date.today().isoformat()}
    with open(path, "w") as f:
        json.dump({"env": env, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
