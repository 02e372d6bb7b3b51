"""FLUX.2 [klein] prompt encoding: Qwen3 hidden states through diffusers' ``Flux2KleinPipeline``."""

from __future__ import annotations

import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

TEXT_TOKENS = 512  # klein's prompt length (Flux2KleinPipeline.tokenizer_max_length)
HIDDEN_LAYERS = (9, 18, 27)  # the Qwen3 layers klein stacks (Flux2KleinPipeline's text_encoder_out_layers)


def encode_prompts(text_encoder, tokenizer, prompts: list[str], *, text_tokens: int = TEXT_TOKENS,
                   hidden_layers: tuple[int, ...] = HIDDEN_LAYERS, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, text_tokens, len(hidden_layers) * hidden) prompt embeddings: the chat-templated prompt padded to
    ``text_tokens``, the Qwen3 hidden states of ``hidden_layers`` stacked per token (diffusers'
    ``Flux2KleinPipeline._get_qwen3_prompt_embeds``). An empty prompt is the unconditional branch of CFG."""
    layers = text_encoder.config.num_hidden_layers
    if not hidden_layers or max(hidden_layers) > layers or min(hidden_layers) < 0:
        raise ValueError(f"hidden_layers={tuple(hidden_layers)} must be hidden-state indices in [0, {layers}] of "
                         f"this {layers}-layer text encoder; klein uses {HIDDEN_LAYERS}")
    return Flux2KleinPipeline._get_qwen3_prompt_embeds(
        text_encoder=text_encoder, tokenizer=tokenizer, prompt=list(prompts), dtype=dtype, device=device,
        max_sequence_length=text_tokens, hidden_states_layers=tuple(hidden_layers))
