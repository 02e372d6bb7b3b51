"""Attention of one segment over itself: the guide's own pass when its keys and values are cached."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ultragen.layout import Segment
from ultragen.policy import AttentionPlan


def attend_within(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, segment: Segment) -> torch.Tensor:
    """q, k, v: (B, H, n, D), the tokens of ``segment`` only, in sequence order -> (B, H, n, D).

    Valid only when the plan's rows of that segment read keys of that segment alone (an isolated guide); if
    every row reads the whole segment this is plain dense SDPA (the fastest kernel the device has)."""
    rows = plan.query_blocks_of(segment)
    table = plan.on(q.device, "table")[rows.start : rows.stop]
    inside = table[:, rows.start : rows.stop]
    if table.sum() != inside.sum():
        raise ValueError(f"the plan's {segment.name.lower()} rows read other segments; it cannot be computed alone")
    if bool(inside.all()):
        return F.scaled_dot_product_attention(q, k, v)
    b = plan.block_tokens
    return F.scaled_dot_product_attention(q, k, v, attn_mask=inside.repeat_interleave(b, 0).repeat_interleave(b, 1))
