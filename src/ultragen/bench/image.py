"""``ultragen bench image``: one whole 4096x4096 image with the FLUX.1-dev architecture (random weights), timed
per stage: text encoding, the 28-step 1K guide, the hierarchical hires pass (18 of 28 steps after the warm start),
and the tiled VAE decode."""

from __future__ import annotations

import time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ultragen.bench.models import random_flux
from ultragen.pipeline.tiny import _byte_tokenizer

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


def random_flux_dev_pipeline(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> FluxPipeline:
    """A FluxPipeline with every FLUX.1-dev component at its real size and random weights."""
    clip_tok = _byte_tokenizer(["<|startoftext|>", "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>", 77,
                               bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    t5_tok = _byte_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", 512, pad_token="<pad>", eos_token="</s>",
                             unk_token="<unk>")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            clip = CLIPTextModel(CLIPTextConfig(**CLIP_L, bos_token_id=clip_tok.bos_token_id,
                                                eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
            t5 = T5EncoderModel(T5Config(**T5_XXL, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id))
            vae = AutoencoderKL(**FLUX_VAE)
    finally:
        torch.set_default_dtype(previous)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae.eval(),
                        text_encoder=clip.eval(), tokenizer=clip_tok, text_encoder_2=t5.eval(), tokenizer_2=t5_tok,
                        transformer=random_flux(device=device, dtype=dtype))


def _compile_cache_record() -> dict:
    """Where the compile caches are and their size after the run (they persist for the next process)."""
    import os

    from ultragen.compile_cache import INDUCTOR_ENV, cache_size_bytes

    path = os.environ.get(INDUCTOR_ENV)
    return {"dir": path, "size_mb": cache_size_bytes(path) / 1e6 if path else None}


def run_image_bench(size_px: int = 4096, backend: str = "auto", compile_blocks: bool = False, fp8: bool = False,
                    offload_text_encoders: bool = False, log=print, style_lora_rank: int | None = None,
                    step_cache: str = "off") -> dict:
    """Generate one image twice (the first call compiles and warms up) and return the second call's stage times;
    ``first_image_s``: the first call's total (the first image of a new process: compiles, or loads them from the
    persistent compile cache, ``ultragen.compile_cache``). ``step_cache``: the hires pass's step cache setting
    (result["step_cache"]: steps computed and skipped).
    ``style_lora_rank``: then load a random style LoRA of that rank on every block linear (unfused) and measure
    again in the same process (result["style_lora"]: its stage times, peak memory and hires time ratio)."""
    from ultragen.pipeline import UltraGenPipeline

    start = time.perf_counter()
    pipe = UltraGenPipeline(random_flux_dev_pipeline(), model="FLUX.1-dev architecture, random weights")
    log(f"pipeline built in {time.perf_counter() - start:.0f} s")
    settings = dict(height=size_px, width=size_px, backend=backend, progress=False, output_type="pt",
                    compile_blocks=compile_blocks, fp8=fp8, offload_text_encoders=offload_text_encoders,
                    step_cache=step_cache)
    start = time.perf_counter()
    warm = pipe("warm-up", **settings)
    first_image_s = time.perf_counter() - start
    log(f"warm-up image (compiles when asked) in {time.perf_counter() - start:.0f} s: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in warm.timings_s.items()))
    torch.cuda.reset_peak_memory_stats()
    out = pipe("a lighthouse on a cliff at dawn, highly detailed", **settings)
    stages = {"text": out.timings_s.get("encode", 0.0), "guide": out.timings_s.get("guide", 0.0),
              "hires": out.timings_s.get("hires", 0.0), "decode": out.timings_s.get("decode", 0.0)}
    result = {"size": f"{size_px}x{size_px}", "total_s": sum(stages.values()), "stages": stages,
              "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "backend": backend, "compile": compile_blocks,
              "fp8": fp8, "offload_text_encoders": offload_text_encoders,
              # the setting: eager blocks and the guide pass chunk by it; compiled blocks run the feed-forward whole
              "ff_chunk_tokens": out.config.ff_chunk_tokens,
              "first_image_s": first_image_s, "first_image_stages": dict(warm.timings_s),
              "compile_cache": _compile_cache_record() if compile_blocks else None,
              "step_cache": pipe.last_step_cache,
              "guide_steps": out.config.guide_steps, "hires_steps": out.config.steps - out.config.warm_start_skip,
              "finite": bool(torch.isfinite(out.images).all())}
    log(result)
    if style_lora_rank:
        import tempfile

        from ultragen.flux.style_lora import write_random_lora

        with tempfile.TemporaryDirectory() as folder:
            path = write_random_lora(pipe.flux.transformer, style_lora_rank, f"{folder}/style.safetensors")
            pipe.load_style_lora(path)
        pipe("warm-up", **settings)  # recompiles the blocks for the adapter when compiled
        torch.cuda.reset_peak_memory_stats()
        styled = pipe("a lighthouse on a cliff at dawn, highly detailed", **settings)
        times = {k: styled.timings_s.get(name, 0.0) for k, name in
                 [("text", "encode"), ("guide", "guide"), ("hires", "hires"), ("decode", "decode")]}
        result["style_lora"] = {"rank": style_lora_rank, "fused": False, "stages": times,
                                "total_s": sum(times.values()), "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                                "hires_time_ratio": times["hires"] / stages["hires"],
                                "finite": bool(torch.isfinite(styled.images).all())}
        log(result["style_lora"])
    return result
