"""CLIP score (Hessel et al. 2021, at torchmetrics' scale) and CLIP-IQA (Wang et al. 2023) from L2-normalised CLIP
embeddings (``ultragen.eval.clip``): two formulas, per image."""

from __future__ import annotations

import torch

CLIPIQA_PROMPTS = ("Good photo.", "Bad photo.")  # CLIP-IQA's antonym pair for overall quality
CLIPIQA_LOGIT_SCALE = 100.0  # CLIP's trained temperature, as in CLIP-IQA and torchmetrics


def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """[N, P], [N, P] (unit rows) -> [N]: 100 * max(cos(image, its prompt), 0). The paper's table divides by 100."""
    return (100.0 * (image_embeds * text_embeds).sum(-1)).clamp(min=0.0)


def clip_iqa_scores(image_embeds: torch.Tensor, anchor_embeds: torch.Tensor) -> torch.Tensor:
    """[N, P], [2, P] (unit rows; "Good photo.", "Bad photo.") -> [N] in (0, 1): the softmax weight of the positive
    prompt over the pair at CLIP's logit scale."""
    logits = CLIPIQA_LOGIT_SCALE * image_embeds @ anchor_embeds.T
    return logits.softmax(-1)[:, 0]
