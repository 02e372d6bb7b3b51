"""``ultragen bench step --family flux2``: the klein architectures' configs and the code path on the CPU."""

import pytest
import torch

from flux2_tiny import tiny_flux2
from ultragen.bench.models import CONFIGS, KLEIN_4B, KLEIN_9B, bench_config
from ultragen.bench.step import run_step_bench

_KEYS = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
         "joint_attention_dim", "timestep_guidance_channels", "mlp_ratio", "axes_dims_rope", "rope_theta",
         "guidance_embeds")


@pytest.mark.parametrize("config, layers, heads, params_b", [(KLEIN_4B, (5, 20), 24, 3.88), (KLEIN_9B, (8, 24), 32, 9.08)])
def test_klein_configs_have_the_real_shapes_and_sizes(config, layers, heads, params_b):
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
    assert (model.config.num_layers, model.config.num_single_layers, model.config.num_attention_heads) == (*layers, heads)
    # the parameter counts measured on the real checkpoints' architecture (research/measured_anchors.md)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(params_b, abs=0.005)


def test_klein_step_bench_runs_dense_and_hierarchical_rows_on_cpu(monkeypatch):
    """Dense rows run the stock Flux2Transformer2DModel, hierarchical rows HierFlux2Transformer, one run."""
    from diffusers import Flux2Transformer2DModel

    from ultragen.flux2 import HierFlux2Transformer

    seen = []
    dense_forward, hier_forward = Flux2Transformer2DModel.forward, HierFlux2Transformer.forward
    monkeypatch.setattr(Flux2Transformer2DModel, "forward",
                        lambda self, *a, **k: seen.append("dense") or dense_forward(self, *a, **k))
    monkeypatch.setattr(HierFlux2Transformer, "forward",
                        lambda self, *a, **k: seen.append("hier") or hier_forward(self, *a, **k))
    config = {k: v for k, v in dict(tiny_flux2().config).items() if k in _KEYS}
    rows = run_step_bench([256], ["reference"], compile_modes=(False,), precisions=("bf16",), config=config,
                          device="cpu", text_tokens=8, block_tokens=8, window_tokens=4, repeats=1, log=lambda _: None,
                          family="flux2")
    assert {(r.mode, r.backend) for r in rows} == {("hier", "reference"), ("dense", "cudnn")}
    assert "dense" in seen and "hier" in seen
    with pytest.raises(ValueError, match="FLUX.1 only"):
        run_step_bench([256], ["reference"], config=config, device="cpu", family="flux2", ff_chunk_tokens=(64,))


def test_bench_step_cli_takes_family_and_config(tmp_path, monkeypatch):
    from ultragen.cli import main

    calls = []
    monkeypatch.setattr("ultragen.bench.step.run_step_bench", lambda *args, **kwargs: calls.append(kwargs) or [])
    assert main(["bench", "step", "--family", "flux2", "--config", "klein-9b", "--sizes", "512", "--backends",
                 "reference", "--compile", "eager", "--precisions", "bf16", "--out", str(tmp_path / "s.json")]) == 0
    assert calls[0]["family"] == "flux2" and calls[0]["config"] == KLEIN_9B
    assert main(["bench", "step", "--family", "flux2", "--config", "dev", "--out", str(tmp_path / "t.json")]) == 2
    assert bench_config("flux1", None) == ("dev", CONFIGS["flux1"]["dev"])
