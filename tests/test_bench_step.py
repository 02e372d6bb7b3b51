"""``ultragen bench step`` runs end to end (tiny model on the CPU; the real numbers come from the GPU)."""

from flux_tiny import tiny_flux
from ultragen.bench.step import run_step_bench, speedups


def test_step_bench_smoke_on_cpu():
    config = dict(tiny_flux().config)
    config = {k: config[k] for k in ("patch_size", "in_channels", "num_layers", "num_single_layers",
                                     "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                                     "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")}
    logs = []
    rows = run_step_bench([256], ["reference"], compile_modes=(False,), precisions=("bf16", "fp8"), config=config, device="cpu",
                          text_tokens=8, block_tokens=8, window_tokens=4, repeats=1, log=logs.append)
    assert {(r.mode, r.backend) for r in rows} == {("hier", "reference"), ("dense", "cudnn")}
    assert all(r.s_per_step > 0 for r in rows)
    assert any("FP8 skipped" in line for line in logs)
    assert speedups(rows)["256x256"]["speedup"] > 0


def test_step_plot_is_written(tmp_path):
    import json

    import pytest

    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install 'ultragen[bench]')")
    from ultragen.bench.plot import plot_step_result

    rows = [{"size": f"{s}x{s}", "mode": m, "backend": "triton" if m == "hier" else "cudnn", "compile": False,
             "fp8": False, "s_per_step": t, "peak_gb": 20.0} for s, m, t in
            [(1024, "hier", 0.2), (2048, "hier", 0.6), (1024, "dense", 0.2), (2048, "dense", 0.9)]]
    result = tmp_path / "step.json"
    result.write_text(json.dumps({"gpu": "test", "torch": "x", "rows": rows}))
    png = plot_step_result(result)
    assert png.suffix == ".png" and png.read_bytes()[:4] == b"\x89PNG"
