"""The reference backend: dense scaled-dot-product attention under the token mask expanded from the block table.

Exact (whatever precision the inputs have), runs on CPU and GPU, and costs O(S^2): the ground truth that every
fast backend is tested against. Query rows are processed in chunks so the boolean mask never exceeds
``MASK_ELEMENTS`` elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ultragen.policy import AttentionPlan

MASK_ELEMENTS = 1 << 26  # bool mask rows x keys per chunk (64 MiB)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """q: (B, H, Sq, D), k, v: (B, H, S, D) -> (B, H, Sq, D). Query block i reads exactly the key blocks the plan
    allows it."""
    b = plan.block_tokens
    seq, rows = k.shape[-2], q.shape[-2]
    table = plan.on(q.device, "table")  # (n_blocks, n_blocks) bool
    rows_per_chunk = max(b, (MASK_ELEMENTS // seq) // b * b)
    out = torch.empty_like(q)
    for start in range(0, rows, rows_per_chunk):
        stop = min(rows, start + rows_per_chunk)
        mask = table[start // b : stop // b].repeat_interleave(b, 0).repeat_interleave(b, 1)
        out[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=mask)
    return out
