"""FLUX.1 (dev, schnell, ``tiny-random``) as an :class:`ultragen.family.ModelFamily`.

Latent grid: the VAE latent in the transformer's space ((z - shift) * scale), (B, 16, H/8, W/8); tokens are its
2x2 patches (diffusers' FluxPipeline packing), 64 channels. Text: CLIP pooled + T5 embeddings. Stage A is the stock
FluxPipeline; the hires pass uses the guidance embedding (dev) and a statically shifted schedule.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from ultragen.family import ModelFamily, ModelInfo, Prompt

_FLUX1_ONLY = re.compile(r"(^|\.)(proj_mlp|ff\.net\.\d|ff_context\.net\.\d|norm1\.linear|single_transformer_blocks\.\d+"
                         r"\.attn\.to_[qkv])$")


class Flux1Family(ModelFamily):
    name = "flux1"
    title = "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    tiny_models = ("tiny-random",)
    latent_px = 8

    # --- models --------------------------------------------------------------------------------------------------
    def load_pipeline(self, model: str, dtype: torch.dtype):
        if model in self.tiny_models:
            from ultragen.pipeline.tiny import tiny_flux_pipeline

            return tiny_flux_pipeline(dtype)
        from diffusers import FluxPipeline

        from ultragen.pipeline.loading import from_pretrained

        return from_pretrained(FluxPipeline, model, dtype=dtype)

    def load_vae(self, model: str, dtype: torch.dtype):
        if model in self.tiny_models:
            from ultragen.pipeline.tiny import tiny_vae

            return tiny_vae(dtype)
        from diffusers import AutoencoderKL

        from ultragen.pipeline.loading import from_pretrained

        return from_pretrained(AutoencoderKL, model, subfolder="vae", dtype=dtype)

    def inspect(self, model: str, root: Path | None) -> ModelInfo:
        from ultragen.pipeline.config import model_defaults

        if root is None:
            from ultragen.pipeline import tiny

            defaults = replace(model_defaults(True, tiny.TINY_TEXT_TOKENS), shift=tiny.TINY_SHIFT)
            return ModelInfo(self.name, tiny.TINY_HEADS, tiny.TINY_HEAD_DIM, defaults)
        from ultragen.pipeline.loading import read_json

        transformer = read_json(model, root / "transformer" / "config.json")
        tokenizer = root / "tokenizer_2" / "tokenizer_config.json"
        max_text = read_json(model, tokenizer).get("model_max_length") if tokenizer.is_file() else None
        max_text = int(max_text) if isinstance(max_text, (int, float)) and max_text < 10**6 else None
        scheduler = read_json(model, root / "scheduler" / "scheduler_config.json")
        defaults = replace(model_defaults(bool(transformer.get("guidance_embeds", False)), max_text),
                           shift=float(scheduler.get("shift", 1.0)))
        return ModelInfo(self.name, int(transformer["num_attention_heads"]), int(transformer["attention_head_dim"]),
                         defaults)

    def defaults(self, pipe):
        from ultragen.pipeline.config import model_defaults

        max_text = getattr(pipe.tokenizer_2, "model_max_length", None)
        return replace(model_defaults(pipe.transformer.config.guidance_embeds, max_text),
                       shift=float(pipe.scheduler.config.shift))

    # --- stages --------------------------------------------------------------------------------------------------
    def encode(self, pipe, prompts, config, device) -> Prompt:
        embeds, pooled, _ = pipe.encode_prompt(prompts, device=device, max_sequence_length=config.text_tokens)
        dtype = pipe.transformer.dtype
        return Prompt(embeds.to(dtype), pooled.to(dtype))

    def stage_a(self, pipe, prompt: Prompt, config, generator, progress, on_step=None) -> torch.Tensor:
        height, width = config.guide_size_px

        def on_step_end(_pipe, i: int, _t, tensors: dict) -> dict:  # diffusers' callback_on_step_end
            last = i + 1 == config.guide_steps
            on_step(i + 1, config.guide_steps, self.unpack(tensors["latents"], height, width) if last else None)
            return {}

        scheduler = pipe.scheduler
        if not config.guide_dynamic_shift and scheduler.config.use_dynamic_shifting:
            pipe.scheduler = type(scheduler).from_config(scheduler.config, use_dynamic_shifting=False)
        pipe.set_progress_bar_config(desc="guide", disable=not progress)
        try:
            packed = pipe(
                prompt_embeds=prompt.embeds, pooled_prompt_embeds=prompt.pooled, height=height, width=width,
                num_inference_steps=config.guide_steps, guidance_scale=config.guide_guidance_scale or 0.0,
                generator=generator, output_type="latent", max_sequence_length=config.text_tokens,
                callback_on_step_end=on_step_end if on_step is not None else None,
            ).images
        finally:
            pipe.scheduler = scheduler
        return self.unpack(packed, height, width)

    def hierarchical(self, transformer, *, backend="auto", ntk_factor=1.0, cache_guide=True, ff_chunk_tokens=None,
                     parallel=None):
        from ultragen.flux import HierFluxTransformer

        return HierFluxTransformer(transformer, backend=backend, ntk_factor=ntk_factor, cache_guide=cache_guide,
                                   ff_chunk_tokens=ff_chunk_tokens, parallel=parallel)

    def hires_scheduler(self, pipe, config, layout, device):
        from ultragen.pipeline.schedule import hires_scheduler

        return hires_scheduler(pipe.scheduler, config.steps, config.warm_start_skip, config.shift, device)

    def velocity(self, hier, x, prompt: Prompt, sigma, plan, guide, config) -> torch.Tensor:
        guidance = None
        if hier.transformer.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), config.guidance_scale, device=x.device, dtype=torch.float32)
        return hier(x, prompt.embeds, prompt.pooled, sigma, plan, guide=guide, guidance=guidance)

    # --- latents -------------------------------------------------------------------------------------------------
    def pack(self, latent):
        from ultragen.pipeline.latents import pack

        return pack(latent)

    def unpack(self, tokens, height_px, width_px):
        from ultragen.pipeline.latents import unpack

        return unpack(tokens, height_px, width_px)

    def decode(self, vae, latent, tile_px, progress):
        from ultragen.pipeline.decode import decode_latents

        return decode_latents(vae, latent, tile_px, progress)

    # --- LoRAs ---------------------------------------------------------------------------------------------------
    def claims_lora(self, modules: set[str]) -> bool:
        return any(_FLUX1_ONLY.search(m) for m in modules)

    def read_lora_metadata(self, path):
        from ultragen.flux.lora import read_lora_metadata

        return read_lora_metadata(path)

    def load_guide_lora(self, transformer, path, expected, allow_mismatch=False):
        from ultragen.flux.lora import load_guide_lora

        return load_guide_lora(transformer, path, expected=expected, allow_mismatch=allow_mismatch)

    def add_guide_lora(self, transformer, rank, alpha, targets=None):
        from ultragen.flux.lora import LoraTargets, add_guide_lora

        add_guide_lora(transformer, rank, alpha, targets or LoraTargets.QKV)

    def save_guide_lora(self, transformer, path, metadata):
        from ultragen.flux.lora import save_guide_lora

        return save_guide_lora(transformer, path, metadata)

    def check_style_lora_file(self, spec):
        from ultragen.flux.style_lora import check_style_lora_file

        return check_style_lora_file(spec)

    def load_style_lora(self, pipe, lora, adapter_name):
        from ultragen.flux.style_lora import load_style_lora

        return load_style_lora(pipe, lora, adapter_name)

    # --- training --------------------------------------------------------------------------------------------------
    def load_transformer(self, model, dtype):
        if model in self.tiny_models:
            from ultragen.pipeline.tiny import tiny_flux_pipeline

            return tiny_flux_pipeline(dtype).transformer
        from diffusers import FluxTransformer2DModel

        from ultragen.pipeline.loading import _from_pretrained

        return _from_pretrained(FluxTransformer2DModel, model, subfolder="transformer", torch_dtype=dtype)

    def with_transformer(self, model, transformer):
        from diffusers import FluxPipeline

        if model in self.tiny_models:
            from ultragen.pipeline.tiny import tiny_flux_pipeline

            return FluxPipeline(**{**tiny_flux_pipeline(transformer.dtype).components, "transformer": transformer})
        from ultragen.pipeline.loading import _from_pretrained

        return _from_pretrained(FluxPipeline, model, transformer=transformer, torch_dtype=transformer.dtype)

    def text_token_limit(self, pipe):
        return getattr(pipe.tokenizer_2, "model_max_length", 512)

    def encode_text(self, pipe, captions, text_tokens):
        embeds, pooled, _ = pipe.encode_prompt(captions, prompt_2=None, device=pipe.transformer.device,
                                               max_sequence_length=text_tokens)
        return Prompt(embeds, pooled)

    def encode_images(self, pipe, images):
        from ultragen.pipeline.latents import to_model_space

        vae = pipe.vae
        return to_model_space(vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode(), vae)

    def sample_images(self, pipe, prompt, size_px, steps, guidance, generator, text_tokens):
        guided = pipe.transformer.config.guidance_embeds  # dev: 28 steps at the guidance scale; schnell: 4, none
        steps, guidance = steps or (28 if guided else 4), guidance if guided else 0.0
        return pipe(prompt=prompt, height=size_px, width=size_px, num_inference_steps=steps, guidance_scale=guidance,
                    generator=generator, max_sequence_length=text_tokens).images

    def train_velocity(self, hier, x, prompt, t, plan, guide, guidance):
        return hier(x, prompt.embeds, prompt.pooled, t, plan, guide=guide, guidance=guidance)

    # --- benchmarks ----------------------------------------------------------------------------------------------
    def random_transformer(self, config, device, dtype, seed=0):
        from ultragen.bench.models import random_flux

        return random_flux(config, device=device, dtype=dtype, seed=seed)

    def random_pipeline(self, parts, device, dtype):
        """``parts``: transformer, clip (CLIPTextConfig), t5 (T5Config), vae (AutoencoderKL), scheduler
        (FlowMatchEulerDiscreteScheduler) arguments; the tokenizers are byte-level with those vocabularies."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from ultragen.pipeline.tiny import _byte_tokenizer

        clip_tok = _byte_tokenizer(["<|startoftext|>", "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>", 77,
                                   bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        t5_tok = _byte_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", 512, pad_token="<pad>", eos_token="</s>",
                                 unk_token="<unk>")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                clip = CLIPTextModel(CLIPTextConfig(**parts["clip"], bos_token_id=clip_tok.bos_token_id,
                                                    eos_token_id=clip_tok.eos_token_id,
                                                    pad_token_id=clip_tok.pad_token_id))
                t5 = T5EncoderModel(T5Config(**parts["t5"], pad_token_id=t5_tok.pad_token_id,
                                             eos_token_id=t5_tok.eos_token_id))
                vae = AutoencoderKL(**parts["vae"])
        finally:
            torch.set_default_dtype(previous)
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**parts["scheduler"]), vae=vae.eval(),
                            text_encoder=clip.eval(), tokenizer=clip_tok, text_encoder_2=t5.eval(),
                            tokenizer_2=t5_tok, transformer=self.random_transformer(parts["transformer"], device, dtype))

    def random_step_inputs(self, model, layout, seed=0):
        from ultragen.bench.models import random_inputs

        return random_inputs(model, layout.hires_tokens, layout.guide_tokens, layout.text_tokens, seed=seed)

    def hier_step(self, hier, inputs, plan):
        return hier(plan=plan, **inputs)

    def dense_step(self, model, inputs, layout):
        raster_ids = layout.hires_to_raster(layout.hires_ids()[None])[0].to(model.device)
        return model(hidden_states=inputs["hires"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
                     img_ids=raster_ids, txt_ids=layout.text_ids().to(model.device),
                     guidance=inputs["guidance"]).sample


FAMILY = Flux1Family()
