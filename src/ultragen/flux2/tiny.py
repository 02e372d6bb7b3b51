"""``tiny-random-klein``: a complete FLUX.2 [klein] pipeline built in code with random weights, offline.

Same classes as FLUX.2-klein (Flux2Transformer2DModel without guidance embedding, AutoencoderKLFlux2 with 8x
downsampling and 2x2 patches, 16 px per token, a Qwen3ForCausalLM text encoder whose stacked hidden states feed the
transformer, FlowMatchEulerDiscreteScheduler with dynamic shifting), at toy widths. The tokenizer is byte-level with
no merges and a Qwen-style chat template, built with the ``tokenizers`` library: nothing comes from the hub.
Weights come from a fixed seed, so every call builds the same pipeline. The images are noise-like; the point is
that every code path runs.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

TINY_SEED = 0
TINY_TEXT_TOKENS = 128  # one attention block of prompt tokens
TINY_HIDDEN_LAYERS = (1, 2, 3)  # the text encoder's hidden states klein stacks (real klein: 9, 18, 27)
TINY_TEXT_WIDTH = 16  # Qwen3 hidden size; the transformer's joint dim is 3x this
TINY_LATENT_CHANNELS = 4  # VAE latent channels; 16 per token after 2x2 patchify
_CHAT_TEMPLATE = (  # Qwen's layout: <|im_start|>role\ncontent<|im_end|>\n ... then the assistant turn
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with Qwen's special tokens and a chat template (every byte one token)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=TINY_TEXT_TOKENS,
                                        pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def tiny_klein_vae() -> AutoencoderKLFlux2:
    """The tiny VAE alone (seeded), e.g. to decode a saved tiny-random-klein latent."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1)
        return AutoencoderKLFlux2(
            latent_channels=TINY_LATENT_CHANNELS, layers_per_block=1, norm_num_groups=4,
            block_out_channels=(8, 8, 8, 8), sample_size=512,
        ).eval()


def tiny_klein_transformer() -> Flux2Transformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return Flux2Transformer2DModel(
            patch_size=1, in_channels=4 * TINY_LATENT_CHANNELS, num_layers=1, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=len(TINY_HIDDEN_LAYERS) * TINY_TEXT_WIDTH,
            timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000,
            guidance_embeds=False,
        ).eval()


def tiny_klein_text_encoder(tokenizer: PreTrainedTokenizerFast) -> Qwen3ForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 2)
        return Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=TINY_TEXT_WIDTH, intermediate_size=32,
            num_hidden_layers=max(TINY_HIDDEN_LAYERS), num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=2 * TINY_TEXT_TOKENS, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )).eval()


def tiny_klein_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """klein's scheduler class and shift settings (dynamic, exponential; the pipeline passes mu)."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")


def tiny_klein_pipeline(torch_dtype: torch.dtype = torch.float32, is_distilled: bool = True) -> Flux2KleinPipeline:
    """The whole tiny pipeline; identical weights on every call. ``is_distilled``: the 4-step variant (no CFG) or
    the base variant (CFG)."""
    tokenizer = tiny_qwen_tokenizer()
    pipe = Flux2KleinPipeline(scheduler=tiny_klein_scheduler(), vae=tiny_klein_vae(),
                              text_encoder=tiny_klein_text_encoder(tokenizer), tokenizer=tokenizer,
                              transformer=tiny_klein_transformer(), is_distilled=is_distilled)
    return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)
