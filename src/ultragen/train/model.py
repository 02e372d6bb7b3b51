"""The model side of training: load only the transformer, freeze it, add the trainable guide LoRA (any family)."""

from __future__ import annotations

import torch
from torch import nn

from ultragen.family import ModelFamily, family_named, family_of_model


def load_transformer(model: str, dtype: torch.dtype) -> nn.Module:
    """The transformer of ``model`` (hub id, local diffusers folder, or a tiny name; family from its
    model_index.json) in ``dtype``, without its text encoders and VAE. A missing model raises MissingWeightsError
    (a ValueError) that says what to download."""
    return family_of_model(model).load_transformer(model, dtype)


def add_trainable_lora(transformer: nn.Module, rank: int, alpha: float, targets,
                       family: ModelFamily | None = None) -> list[nn.Parameter]:
    """Freeze every weight of ``transformer``, inject a fresh guide LoRA of ``family`` (None: FLUX.1) on its
    ``targets`` (the family's LoraTargets value: "qkv" or "wide") and return its parameters (float32, the only ones
    with ``requires_grad``; B starts at zero, so step 0 is the base model)."""
    transformer.requires_grad_(False)
    (family or family_named("flux1")).add_guide_lora(transformer, rank, alpha, str(getattr(targets, "value", targets)))
    params = []
    for name, param in transformer.named_parameters():
        is_lora = "lora_" in name
        param.requires_grad_(is_lora)
        if is_lora:
            param.data = param.data.float()  # master weights in fp32; autocast runs the matmuls in bf16
            params.append(param)
    if not params:
        raise AssertionError("add_guide_lora injected no parameters")
    return params
