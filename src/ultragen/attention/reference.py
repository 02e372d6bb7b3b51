"""The reference backend: dense scaled-dot-product attention under the token mask expanded from the block table.

Exact (whatever precision the inputs have), runs on CPU and GPU, and costs O(S^2): the ground truth that every
fast backend is tested against. Query rows are processed in chunks so the boolean mask never exceeds
``MASK_ELEMENTS`` elements. On CUDA, PyTorch's masked memory-efficient SDPA kernel is wrong for more than 65,536
keys, so above that the math kernel runs, in chunks whose fp32 scores stay under ``SCORE_BYTES``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ultragen.policy import AttentionPlan

MASK_ELEMENTS = 1 << 26  # bool mask rows x keys per chunk (64 MiB)
SCORE_BYTES = 1 << 30  # fp32 score matrix per chunk when the math kernel runs
CUDA_MASKED_KEYS_LIMIT = 65536  # the masked efficient-attention kernel is silently wrong beyond this


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, out: torch.Tensor | None = None
) -> torch.Tensor:
    """q: (B, H, Sq, D), k, v: (B, H, S, D) -> (B, H, Sq, D), into ``out`` (like q) when given. Query block i reads
    exactly the key blocks the plan allows it."""
    b = plan.block_tokens
    seq, rows = k.shape[-2], q.shape[-2]
    table = plan.on(q.device, "table")  # (n_blocks, n_blocks) bool
    rows_per_chunk = max(b, (MASK_ELEMENTS // seq) // b * b)
    kernel = contextlib.nullcontext()
    if q.is_cuda and seq > CUDA_MASKED_KEYS_LIMIT:
        kernel = sdpa_kernel(SDPBackend.MATH)
        score_rows = SCORE_BYTES // (4 * q.shape[0] * q.shape[1] * seq)
        rows_per_chunk = max(b, min(rows_per_chunk, score_rows // b * b))
    out = torch.empty_like(q) if out is None else out
    with kernel:
        for start in range(0, rows, rows_per_chunk):
            stop = min(rows, start + rows_per_chunk)
            mask = table[start // b : stop // b].repeat_interleave(b, 0).repeat_interleave(b, 1)
            out[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=mask)
    return out
