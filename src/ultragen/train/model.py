"""The model side of training: load only the transformer, freeze it, add the trainable guide LoRA."""

from __future__ import annotations

import torch
from torch import nn

from ultragen.flux.lora import LoraTargets, add_guide_lora
from ultragen.pipeline.loading import TINY_RANDOM, _from_pretrained


def load_transformer(model: str, dtype: torch.dtype) -> nn.Module:
    """The FLUX.1 transformer of ``model`` (hub id, local diffusers folder, or ``tiny-random``) in ``dtype``,
    without its text encoders and VAE. A missing model raises MissingWeightsError (a ValueError) that says what to
    download."""
    if model == TINY_RANDOM:
        from ultragen.pipeline.tiny import tiny_flux_pipeline

        return tiny_flux_pipeline(dtype).transformer
    from diffusers import FluxTransformer2DModel

    return _from_pretrained(FluxTransformer2DModel, model, subfolder="transformer", torch_dtype=dtype)


def add_trainable_lora(transformer: nn.Module, rank: int, alpha: float,
                       targets: LoraTargets | str) -> list[nn.Parameter]:
    """Freeze every weight of ``transformer``, inject a fresh guide LoRA and return its parameters (float32, the
    only ones with ``requires_grad``; B starts at zero, so step 0 is the base model)."""
    transformer.requires_grad_(False)
    add_guide_lora(transformer, rank=rank, alpha=alpha, targets=targets)
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
