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


# ---- bench image --family flux2 ------------------------------------------------------------------------------------

def _tiny_klein_parts() -> dict:
    """tiny-random-klein's components as ``random_pipeline`` parts (the real ones are billions of parameters)."""
    from ultragen.flux2 import tiny

    pipe = tiny.tiny_klein_pipeline()
    transformer = {k: v for k, v in dict(pipe.transformer.config).items() if k in _KEYS}
    qwen = pipe.text_encoder.config
    text_encoder = dict(vocab_size=qwen.vocab_size, hidden_size=qwen.hidden_size,
                        intermediate_size=qwen.intermediate_size, num_hidden_layers=qwen.num_hidden_layers,
                        num_attention_heads=qwen.num_attention_heads, num_key_value_heads=qwen.num_key_value_heads,
                        head_dim=qwen.head_dim, max_position_embeddings=qwen.max_position_embeddings)
    vae = dict(latent_channels=tiny.TINY_LATENT_CHANNELS, layers_per_block=1, norm_num_groups=4,
               block_out_channels=(8, 8, 8, 8), sample_size=512)  # untiled at 512 px unless vae_tile_px
    return dict(transformer=transformer, text_encoder=text_encoder, vae=vae, text_tokens=tiny.TINY_TEXT_TOKENS)


def test_klein_bench_image_runs_the_whole_distilled_image_on_cpu(monkeypatch):
    """The klein path of `bench image`: stock Flux2KleinPipeline guide (4 steps at a quarter of the size), 4 hires
    steps through HierFlux2Transformer from noise, AutoencoderKLFlux2 tiled decode; same JSON schema as FLUX.1."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    from ultragen.bench.image import run_image_bench
    from ultragen.flux2 import HierFlux2Transformer

    seen = {"guide": [], "hier": 0, "decode": []}
    klein_call, hier_forward = Flux2KleinPipeline.__call__, HierFlux2Transformer.forward
    from diffusers.models.autoencoders.vae import Decoder

    tiled, decoder_forward = AutoencoderKLFlux2.tiled_decode, Decoder.forward
    monkeypatch.setattr(Flux2KleinPipeline, "__call__", lambda self, *a, **k: seen["guide"].append(
        (k["height"], k["width"], k["num_inference_steps"])) or klein_call(self, *a, **k))

    def hier(self, *a, **k):
        seen["hier"] += 1
        return hier_forward(self, *a, **k)

    monkeypatch.setattr(HierFlux2Transformer, "forward", hier)
    monkeypatch.setattr(AutoencoderKLFlux2, "tiled_decode", lambda self, *a, **k: seen["decode"].append(
        "tiled") or tiled(self, *a, **k))
    monkeypatch.setattr(Decoder, "forward", lambda self, z, *a, **k: seen["decode"].append(
        tuple(z.shape[-2:])) or decoder_forward(self, z, *a, **k))
    result = run_image_bench(512, "reference", family="flux2", device="cpu", dtype=torch.float32,
                             parts=_tiny_klein_parts(), log=lambda _: None, vae_tile_px=256)
    assert set(result["stages"]) == {"text", "guide", "hires", "decode"}
    assert all(t > 0 for t in result["stages"].values()) and result["finite"]
    assert result["first_image_s"] > 0 and result["family"] == "flux2"
    assert (result["guide_steps"], result["hires_steps"], result["guide_size"]) == (4, 4, "128x128")
    assert seen["guide"] == [(128, 128, 4)] * 2  # warm-up image and measured image
    assert seen["hier"] == 2 * 4
    # 512 px = 64 latent px at /8; tiles of 256 px = 32 latent px with overlap: several tiles, none the whole image
    tiles = [s for s in seen["decode"] if s != "tiled"]
    assert seen["decode"].count("tiled") == 2 and len(tiles) >= 2 * 4 and max(max(s) for s in tiles) < 64


@pytest.mark.parametrize("config, text_b", [("klein-4b", 4.02), ("klein-9b", 8.19)])
def test_klein_bench_image_components_have_the_real_sizes(config, text_b):
    """Built on the meta device: the Qwen3 text encoder of the published size (Qwen3-4B: 4.02 B, Qwen3-8B: 8.19 B
    parameters), the FLUX.2 VAE (32 latent channels, 84 M) and the klein transformer."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    from ultragen.bench.image import random_pipeline

    pipe = random_pipeline("flux2", config, device="meta", dtype=torch.bfloat16)
    assert isinstance(pipe, Flux2KleinPipeline) and isinstance(pipe.vae, AutoencoderKLFlux2)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e9  # noqa: E731
    assert count(pipe.text_encoder) == pytest.approx(text_b, abs=0.01)
    assert count(pipe.transformer) == pytest.approx({"klein-4b": 3.88, "klein-9b": 9.08}[config], abs=0.005)
    assert pipe.vae.config.latent_channels == 32 and count(pipe.vae) == pytest.approx(0.084, abs=0.002)
    assert pipe.config.is_distilled and pipe.tokenizer.model_max_length == 512


def test_bench_image_cli_takes_family_and_config(tmp_path, monkeypatch):
    from ultragen.cli import main

    calls = []
    monkeypatch.setattr("ultragen.bench.image.run_image_bench",
                        lambda *args, **kwargs: calls.append(kwargs) or {"total_s": 1.0})
    monkeypatch.setattr("ultragen.bench.record.environment", lambda: {"gpu": "none (test)"})
    assert main(["bench", "image", "--family", "flux2", "--config", "klein-9b", "--size", "8192", "--compile",
                 "--out", str(tmp_path / "i.json")]) == 0
    assert (calls[0]["family"], calls[0]["config"], calls[0]["compile_blocks"]) == ("flux2", "klein-9b", True)
    assert main(["bench", "image", "--family", "flux2", "--out", str(tmp_path / "j.json")]) == 0
    assert calls[1]["config"] == "klein-4b"
    assert main(["bench", "image", "--family", "flux2", "--config", "dev", "--out", str(tmp_path / "k.json")]) == 2
    assert len(calls) == 2
