"""``tiny-random``: a complete FLUX.1 pipeline built in code with random weights, for smoke runs offline.

Same classes as FLUX.1-dev (FluxTransformer2DModel with a guidance embedding, AutoencoderKL with 8x downsampling and
16 px per packed token, CLIP + T5 text encoders, FlowMatchEulerDiscreteScheduler with dev's shift settings), at toy
widths. Tokenizers are byte-level with no merges, built with the ``tokenizers`` library: nothing comes from the hub.
Weights are drawn from a fixed seed, so the same pipeline is built every time (and ``ultragen decode`` can rebuild the
VAE). The images are noise-like; the point is that every code path runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported where used: the constants below are read by dry runs without diffusers
    from diffusers import AutoencoderKL, FluxPipeline
    from transformers import PreTrainedTokenizerFast

TINY_SEED = 0
TINY_TEXT_TOKENS = 128  # one attention block of prompt tokens
TINY_WIDTH = 32  # text embedding width of both encoders = the transformer's joint and pooled dims
TINY_HEADS, TINY_HEAD_DIM = 2, 16  # the transformer's attention shape
TINY_SHIFT = 3.0  # the scheduler's static shift (FLUX.1-dev's)


def _byte_tokenizer(specials: list[str], template: str, max_length: int, **special_roles) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges: every byte of the prompt is one token (ids differ per prompt)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    used = [s for s in specials if s in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(s, vocab[s]) for s in used])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **special_roles)


def tiny_tokenizers() -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """(CLIP-like tokenizer, 77 tokens; T5-like tokenizer, TINY_TEXT_TOKENS tokens)."""
    clip = _byte_tokenizer(["<|startoftext|>", "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>", 77,
                           bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    t5 = _byte_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", TINY_TEXT_TOKENS,
                         pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return clip, t5


def tiny_vae(torch_dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The tiny VAE alone (seeded, drawn in float32 then cast), e.g. to decode a saved tiny-random latent."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[8, 8, 8, 8], sample_size=512, use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=1.5035, shift_factor=0.0609,  # FLUX.1's values
        ).eval()
        return _cast(vae, torch_dtype)


def _cast(model: torch.nn.Module, torch_dtype: torch.dtype) -> torch.nn.Module:
    """``model`` in ``torch_dtype``. A plain module cast: diffusers' ``ModelMixin.to(dtype)`` warns on every cast
    about modules to keep in float32 (even when, as here, there are none)."""
    return model if torch_dtype == torch.float32 else torch.nn.Module.to(model, torch_dtype)


def tiny_flux_pipeline(torch_dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """The whole tiny pipeline; identical weights on every call."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = tiny_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=TINY_HEAD_DIM,
            num_attention_heads=TINY_HEADS, joint_attention_dim=TINY_WIDTH, pooled_projection_dim=TINY_WIDTH,
            axes_dims_rope=(4, 6, 6), guidance_embeds=True,
        )
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=TINY_WIDTH, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, projection_dim=TINY_WIDTH,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        ))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=TINY_WIDTH, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        ))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=TINY_SHIFT, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(scheduler=scheduler, vae=tiny_vae(torch_dtype), text_encoder=_cast(clip.eval(), torch_dtype),
                        tokenizer=clip_tok, text_encoder_2=_cast(t5.eval(), torch_dtype), tokenizer_2=t5_tok,
                        transformer=_cast(transformer.eval(), torch_dtype))
