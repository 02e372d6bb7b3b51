"""``ultragen bench step`` runs end to end (tiny model on the CPU; the real numbers come from the GPU)."""

from flux_tiny import tiny_flux
from ultragen.bench.step import run_step_bench, speedups


_TINY_KEYS = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
              "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds",
              "axes_dims_rope")


def test_step_bench_smoke_on_cpu(monkeypatch):
    """Each row times its own step: a hierarchical step made 0.6 s slower and a dense one 0.1 s slower show up as
    at least that in their rows (a bench that timed nothing, the other mode, or only setup would not), and the
    speedup is the ratio of the two."""
    import time

    from diffusers import FluxTransformer2DModel

    from ultragen.flux import HierFluxTransformer

    class SlowHier(HierFluxTransformer):
        def forward(self, *args, **kwargs):
            time.sleep(0.6)
            return super().forward(*args, **kwargs)

    dense_forward = FluxTransformer2DModel.forward

    def slow_dense(self, *args, **kwargs):
        time.sleep(0.1)
        return dense_forward(self, *args, **kwargs)

    monkeypatch.setattr("ultragen.flux.HierFluxTransformer", SlowHier)
    monkeypatch.setattr(FluxTransformer2DModel, "forward", slow_dense)
    config = {k: v for k, v in dict(tiny_flux().config).items() if k in _TINY_KEYS}
    logs = []
    rows = run_step_bench([256], ["reference"], compile_modes=(False,), precisions=("bf16", "fp8"), config=config, device="cpu",
                          text_tokens=8, block_tokens=8, window_tokens=4, repeats=1, log=logs.append)
    assert {(r.mode, r.backend) for r in rows} == {("hier", "reference"), ("dense", "cudnn")}
    hier, dense = (next(r for r in rows if r.mode == m) for m in ("hier", "dense"))
    assert hier.s_per_step >= 0.6 and 0.1 <= dense.s_per_step < 0.5  # the tiny steps themselves take ~0.05 s
    assert any("FP8 skipped" in line for line in logs)
    assert speedups(rows)["256x256"]["speedup"] == dense.s_per_step / hier.s_per_step


def test_median_s_times_the_calls_after_the_warm_up_and_takes_the_median(monkeypatch):
    """With a scripted clock: the warm-up call is not timed, each repeat is timed from just before to just after the
    call, and the median of the repeats is returned; repeats=0 times the one call."""
    from ultragen.bench import step

    clock = {"now": 0.0}
    durations = iter([100.0, 1.0, 5.0, 2.0, 7.0])  # warm-up, then three repeats; then the repeats=0 call

    def call():
        clock["now"] += next(durations)
        return clock["now"]

    monkeypatch.setattr(step.time, "perf_counter", lambda: clock["now"])
    seconds, out = step.median_s(call, repeats=3)
    assert seconds == 2.0 and out == 108.0  # median of 1, 5, 2; the output of the last call
    assert step.median_s(call, repeats=0) == (7.0, 115.0)


def test_step_bench_measures_each_ff_chunk_variant(tmp_path, monkeypatch):
    import pytest

    from ultragen.cli import main
    from ultragen.flux import HierFluxTransformer

    used = []

    class Recording(HierFluxTransformer):
        def forward(self, *args, **kwargs):
            used.append(self.ff_chunk_tokens)
            return super().forward(*args, **kwargs)

    monkeypatch.setattr("ultragen.flux.HierFluxTransformer", Recording)
    config = {k: v for k, v in dict(tiny_flux().config).items() if k in _TINY_KEYS}
    rows = run_step_bench([256], ["reference"], compile_modes=(False,), precisions=("bf16",), config=config,
                          device="cpu", text_tokens=8, block_tokens=8, window_tokens=4, repeats=1, log=lambda _: None,
                          ff_chunk_tokens=(None, 64))  # 256 hires tokens: 4 chunks
    assert sorted((r.mode, r.ff_chunk_tokens or 0) for r in rows) == [("dense", 0), ("hier", 0), ("hier", 64)]
    assert set(used) == {None, 64}
    used.clear()
    monkeypatch.setattr(Recording, "compile_blocks", lambda self: None)  # the compiled path, without compiling
    logs = []
    rows = run_step_bench([256], ["reference"], compile_modes=(True,), precisions=("bf16",), config=config,
                          device="cpu", text_tokens=8, block_tokens=8, window_tokens=4, repeats=1, log=logs.append,
                          dense=False, ff_chunk_tokens=(None, 64))
    assert [(r.compile, r.ff_chunk_tokens) for r in rows] == [(True, None)]  # compiled blocks run whole
    assert set(used) == {None}
    assert any("chunk variants are measured eager only" in line for line in logs)
    with pytest.raises(ValueError, match="ff_chunk_tokens=0 must be None"):
        run_step_bench([256], ["reference"], ff_chunk_tokens=(None, 0), config=config, device="cpu")
    calls = []
    monkeypatch.setattr("ultragen.bench.step.run_step_bench", lambda *args, **kwargs: calls.append(kwargs) or [])
    assert main(["bench", "step", "--ff-chunk-tokens", "0", "16384", "65536", "--out", str(tmp_path / "s.json")]) == 0
    assert main(["bench", "step", "--out", str(tmp_path / "t.json")]) == 0
    assert main(["bench", "step", "--ff-chunk-tokens", "16384", "--out", str(tmp_path / "u.json")]) == 0
    assert [c["ff_chunk_tokens"] for c in calls] == [[None, 16384, 65536], [None], [16384]]


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


def test_step_bench_measures_with_and_without_the_guide_cache(tmp_path, monkeypatch):
    from ultragen.cli import main
    from ultragen.flux import HierFluxTransformer

    passes = []

    class Recording(HierFluxTransformer):
        def _guide_pass(self, *args, **kwargs):
            passes.append(self.cache_guide)
            return super()._guide_pass(*args, **kwargs)

    monkeypatch.setattr("ultragen.flux.HierFluxTransformer", Recording)
    config = {k: v for k, v in dict(tiny_flux().config).items() if k in _TINY_KEYS}
    rows = run_step_bench([256], ["reference"], compile_modes=(False,), precisions=("bf16",), config=config,
                          device="cpu", text_tokens=8, block_tokens=8, window_tokens=4, repeats=2, log=lambda _: None,
                          dense=False, guide_cache=(True, False))
    assert sorted(r.guide_cache for r in rows) == [False, True]
    assert passes == [True]  # cached: one guide pass for warm-up and both timed calls; uncached: none (in-stream)
    calls = []
    monkeypatch.setattr("ultragen.bench.step.run_step_bench", lambda *args, **kwargs: calls.append(kwargs) or [])
    assert main(["bench", "step", "--guide-cache", "on", "off", "--out", str(tmp_path / "s.json")]) == 0
    assert main(["bench", "step", "--out", str(tmp_path / "t.json")]) == 0
    assert [c["guide_cache"] for c in calls] == [[True, False], [True]]


def test_bench_image_cli_passes_its_levers(tmp_path, monkeypatch):
    """The whole-image benchmark needs a GPU and full-size weights; here only what the CLI hands it."""
    from ultragen.cli import main

    calls = []
    monkeypatch.setattr("ultragen.bench.image.run_image_bench",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or {"total_s": 1.0})
    monkeypatch.setattr("ultragen.bench.record.environment", lambda: {"gpu": "none (test)"})
    out = tmp_path / "i.json"
    assert main(["bench", "image", "--compile", "--fp8", "--offload-text-encoders", "--out", str(out)]) == 0
    assert main(["bench", "image", "--style-lora-rank", "64", "--cache", "fbcache:0.1", "--out", str(out)]) == 0
    flux1 = {"family": "flux1", "config": "dev"}
    assert calls == [((4096, "auto"), {"compile_blocks": True, "fp8": True, "offload_text_encoders": True,
                                       "style_lora_rank": None, "step_cache": "off", **flux1}),
                     ((4096, "auto"), {"compile_blocks": False, "fp8": False, "offload_text_encoders": False,
                                       "style_lora_rank": 64, "step_cache": "fbcache:0.1", **flux1})]
    assert '"total_s": 1.0' in out.read_text()
