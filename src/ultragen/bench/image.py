"""``ultragen bench image``: one whole image (default 4096x4096) with a real architecture and random weights, timed
per stage: text encoding, the guide at 1K, the hierarchical hires pass, and the tiled VAE decode.

``--family flux1 --config dev`` (default): every FLUX.1-dev component at its real size, the 28-step guide and 18 of
28 hires steps after the warm start. ``--family flux2 --config klein-4b|klein-9b``: the klein transformer, its Qwen3
text encoder (Qwen3-4B / Qwen3-8B) and ``AutoencoderKLFlux2`` at their real sizes, the distilled schedule (4 guide + 4
hires steps, no warm start, no CFG). The pipeline is built through the family (:meth:`ModelFamily.random_pipeline`)
from :data:`PIPELINES`; the run goes through ``UltraGenPipeline`` with the model's own defaults."""

from __future__ import annotations

import time

import torch

from ultragen.bench.models import bench_config
from ultragen.family import family_named

# The text encoders and VAE of black-forest-labs/FLUX.1-dev (CLIP ViT-L/14 text tower, T5 v1.1 XXL encoder, the
# 16-channel FLUX VAE), random weights; tokenizers are byte-level stand-ins with the real vocabulary sizes.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, projection_dim=768)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[128, 256, 512, 512], sample_size=1024, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
FLUX_DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                          base_image_seq_len=256, max_image_seq_len=4096)

# FLUX.2 [klein]'s text encoders: Qwen/Qwen3-4B (klein-4B: hidden 2560, tied embeddings) and Qwen/Qwen3-8B (klein-9B:
# hidden 4096); klein stacks their hidden states 9, 18, 27 (3 x hidden = the transformer's joint_attention_dim).
_QWEN3 = dict(vocab_size=151936, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
              max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
QWEN3_4B = dict(_QWEN3, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True)
QWEN3_8B = dict(_QWEN3, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
# FLUX.2's VAE (vae/config.json of the klein checkpoints): 32 latent channels, 2x2 patches -> 128 per token; these
# are AutoencoderKLFlux2's defaults, spelled out so a change of defaults cannot change the benchmark
KLEIN_VAE = dict(in_channels=3, out_channels=3, latent_channels=32, layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024, use_quant_conv=True,
                 use_post_quant_conv=True, patch_size=(2, 2))

# the non-transformer parts of each benchmarked pipeline (``--family F --config C``; transformers: bench.models)
PIPELINES = {
    "flux1": {"dev": dict(clip=CLIP_L, t5=T5_XXL, vae=FLUX_VAE, scheduler=FLUX_DEV_SCHEDULER)},
    "flux2": {"klein-4b": dict(text_encoder=QWEN3_4B, vae=KLEIN_VAE, text_tokens=512, is_distilled=True),
              "klein-9b": dict(text_encoder=QWEN3_8B, vae=KLEIN_VAE, text_tokens=512, is_distilled=True)},
}
TITLES = {"dev": "FLUX.1-dev", "klein-4b": "FLUX.2 [klein] 4B", "klein-9b": "FLUX.2 [klein] 9B"}


def pipeline_parts(family: str, config: str | None) -> tuple[str, dict]:
    """(config name, parts) of ``--family F --config C``: the transformer architecture and the other components."""
    name, transformer = bench_config(family, config)
    return name, dict(PIPELINES[family][name], transformer=transformer)


def random_pipeline(family: str = "flux1", config: str | None = None, device: str = "cuda",
                    dtype: torch.dtype = torch.bfloat16, parts: dict | None = None):
    """The stock diffusers pipeline of ``--family F --config C`` with every component at its real size and random
    weights (``parts``: other components, e.g. tiny ones in tests)."""
    if parts is None:
        config, parts = pipeline_parts(family, config)
    return family_named(family).random_pipeline(parts, device, dtype)


def random_flux_dev_pipeline(device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A FluxPipeline with every FLUX.1-dev component at its real size and random weights."""
    return random_pipeline("flux1", "dev", device, dtype)


def _peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _compile_cache_record() -> dict:
    """Where the compile caches are and their size after the run (they persist for the next process)."""
    import os

    from ultragen.compile_cache import INDUCTOR_ENV, cache_size_bytes

    path = os.environ.get(INDUCTOR_ENV)
    return {"dir": path, "size_mb": cache_size_bytes(path) / 1e6 if path else None}


def run_image_bench(size_px: int = 4096, backend: str = "auto", compile_blocks: bool = False, fp8: bool = False,
                    offload_text_encoders: bool = False, log=print, style_lora_rank: int | None = None,
                    fuse_style_lora: bool = False,
                    step_cache: str = "off", family: str = "flux1", config: str | None = None,
                    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, parts: dict | None = None,
                    **settings) -> dict:
    """Generate one image twice (the first call compiles and warms up) and return the second call's stage times;
    ``first_image_s``: the first call's total (the first image of a new process: compiles, or loads them from the
    persistent compile cache, ``ultragen.compile_cache``). ``step_cache``: the hires pass's step cache setting
    (result["step_cache"]: steps computed and skipped).
    ``style_lora_rank``: then load a random style LoRA of that rank on every block linear (unfused) and measure
    again in the same process (result["style_lora"]: its stage times, peak memory and hires time ratio).
    ``fuse_style_lora``: that LoRA merged into the weights (``load_style_lora(fuse=True)``) instead; with ``fp8`` on
    a freshly built pipeline, fused in bf16 before it is quantized.
    ``family`` / ``config``: the architecture (``--family``, ``--config``); ``parts``: replaces its components
    (tests run tiny ones on the CPU with ``device="cpu"``); ``settings``: further GenerationConfig fields."""
    from ultragen.pipeline import UltraGenPipeline

    if fuse_style_lora and not style_lora_rank:
        raise ValueError("--fuse-style-lora measures a fused style LoRA but no --style-lora-rank was given; add "
                         "--style-lora-rank 64")
    start = time.perf_counter()
    if parts is None:
        config, parts = pipeline_parts(family, config)
    title = TITLES.get(config, f"{family} {config}")
    pipe = UltraGenPipeline(random_pipeline(family, config, device, dtype, parts),
                            model=f"{title} architecture, random weights")
    log(f"pipeline built in {time.perf_counter() - start:.0f} s")
    settings = dict(height=size_px, width=size_px, backend=backend, progress=False, output_type="pt",
                    compile_blocks=compile_blocks, fp8=fp8, offload_text_encoders=offload_text_encoders,
                    step_cache=step_cache, **settings)
    start = time.perf_counter()
    warm = pipe("warm-up", **settings)
    first_image_s = time.perf_counter() - start
    log(f"warm-up image (compiles when asked) in {time.perf_counter() - start:.0f} s: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in warm.timings_s.items()))
    _reset_peak()
    out = pipe("a lighthouse on a cliff at dawn, highly detailed", **settings)
    stages = {"text": out.timings_s.get("encode", 0.0), "guide": out.timings_s.get("guide", 0.0),
              "hires": out.timings_s.get("hires", 0.0), "decode": out.timings_s.get("decode", 0.0)}
    result = {"family": family, "config": config, "model": title,
              "size": f"{size_px}x{size_px}", "total_s": sum(stages.values()), "stages": stages,
              "peak_gb": _peak_gb(), "backend": backend, "compile": compile_blocks,
              "fp8": fp8, "offload_text_encoders": offload_text_encoders,
              # the setting: eager blocks and the guide pass chunk by it; compiled blocks run the feed-forward whole
              "ff_chunk_tokens": out.config.ff_chunk_tokens,
              "first_image_s": first_image_s, "first_image_stages": dict(warm.timings_s),
              "compile_cache": _compile_cache_record() if compile_blocks else None,
              "step_cache": pipe.last_step_cache,
              "guide_size": "x".join(str(px) for px in out.config.guide_size_px[::-1]),
              "guide_steps": out.config.guide_steps, "hires_steps": out.config.steps - out.config.warm_start_skip,
              "finite": bool(torch.isfinite(out.images).all())}
    log(result)
    if style_lora_rank:
        import tempfile

        from ultragen.flux.style_lora import write_random_lora

        if fuse_style_lora and fp8:  # FP8 weights cannot take a merge: a fresh bf16 pipeline, fused, then quantized
            model = pipe.model
            del pipe, warm, out
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            pipe = UltraGenPipeline(random_pipeline(family, config, device, dtype, parts), model=model)
        with tempfile.TemporaryDirectory() as folder:
            path = write_random_lora(pipe.flux.transformer, style_lora_rank, f"{folder}/style.safetensors")
            pipe.load_style_lora(path, fuse=fuse_style_lora)
        pipe("warm-up", **settings)  # recompiles the blocks for the adapter when compiled
        _reset_peak()
        styled = pipe("a lighthouse on a cliff at dawn, highly detailed", **settings)
        times = {k: styled.timings_s.get(name, 0.0) for k, name in
                 [("text", "encode"), ("guide", "guide"), ("hires", "hires"), ("decode", "decode")]}
        result["style_lora"] = {"rank": style_lora_rank, "fused": fuse_style_lora, "stages": times,
                                "total_s": sum(times.values()), "peak_gb": _peak_gb(),
                                "hires_time_ratio": times["hires"] / stages["hires"],
                                "finite": bool(torch.isfinite(styled.images).all())}
        log(result["style_lora"])
    return result
