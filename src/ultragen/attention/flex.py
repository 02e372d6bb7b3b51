"""The ``flex`` backend: PyTorch FlexAttention over a ``BlockMask`` built straight from the plan's block table.

Every allowed block is full, so the mask has only "full" blocks (no ``mask_mod`` is ever evaluated): zero partial
counts, ``full_kv_num_blocks = kv_counts`` and ``full_kv_indices`` padded to the number of key blocks (FlexAttention
wants the index table as wide as the key-block count, not the row maximum). The mask is cached per (plan, device)
and ``flex_attention`` is compiled once with ``dynamic=False``: one compilation per sequence shape, none on later
calls.

Only the compiled path is used: eager ``flex_attention`` with a ``from_kv_blocks`` mask was measured wrong on CPU.
The compiled path matches the reference on CPU (float32, bf16) and on CUDA (bf16, fp16), which the tests check.

On CPU, head dims below ``CPU_MIN_HEAD_DIM`` are zero-padded to it (scale kept at 1/sqrt(D)): inductor's CPU
FlexAttention template (torch 2.13) computes Q.K^T with a micro-GEMM whose transposed-B, outer-product variant
ignores the tail of the key block. It is chosen when the head dim is a multiple of the vector width and below 24;
with AVX2 (8 fp32 lanes), head dim 16 and a key block of 8 tokens it writes 16 score columns into rows 8 wide, and
the last row's overflow lands on the running row maxima: garbage or NaN output. AVX-512 (16 lanes) never takes that
variant for such a block. See docs/design.md, "Fast attention backends". :mod:`ultragen.attention.flex_check`
guards the backend against this kind of failure in general.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable

import torch

from ultragen.policy import AttentionPlan

log = logging.getLogger(__name__)

CUDA_DTYPES = (torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.float32, torch.bfloat16)
CPU_MIN_HEAD_DIM = 32  # smaller head dims are zero-padded on CPU (inductor's Q.K^T micro-GEMM; see above)
RECOMPILE_LIMIT = 64  # one compile per sequence shape; the default limit (8) would silently fall back to eager

_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # plan -> {device: BlockMask}
_COMPILED: list[Callable] = []


def flex_missing() -> str | None:
    """None when FlexAttention imports, else why not."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as error:
        return f"torch {torch.__version__} has no FlexAttention ({error}); it needs torch >= 2.5"
    return None


def why_not_flex(q: torch.Tensor, plan: AttentionPlan) -> str | None:
    """None when the flex backend can run these inputs, else the reason."""
    if reason := flex_missing():
        return reason
    if q.device.type == "cuda":
        if q.dtype not in CUDA_DTYPES:
            return f"dtype {q.dtype} unsupported on CUDA; cast q, k, v to torch.bfloat16 or torch.float16"
        if plan.block_tokens % 64:
            return f"plan block of {plan.block_tokens} tokens unsupported on CUDA; use block_tokens 64 or 128"
    elif q.device.type == "cpu":
        if q.dtype not in CPU_DTYPES:
            return f"dtype {q.dtype} unsupported on CPU; use torch.float32 or torch.bfloat16"
    else:
        return f"device {q.device.type!r} unsupported; use CUDA or CPU"
    if q.shape[-1] < 16 or q.shape[-1] & (q.shape[-1] - 1):
        return f"head dim {q.shape[-1]} unsupported; FlexAttention wants a power of two >= 16"
    return None


def block_mask(plan: AttentionPlan, device: torch.device | str, q_blocks: int | None = None):
    """The plan's leading ``q_blocks`` query rows (default all) as a full-blocks-only ``BlockMask`` on ``device``
    (cached per plan, device and row count)."""
    device = torch.device(device)
    rows = plan.n_blocks if q_blocks is None else q_blocks
    per_plan = _MASKS.setdefault(plan, {})
    key = (str(device), rows)
    if key not in per_plan:
        per_plan[key] = full_block_mask(plan.kv_counts[:rows], plan.kv_indices[:rows], plan.n_blocks,
                                        plan.block_tokens, device)
    return per_plan[key]


def full_block_mask(kv_counts: torch.Tensor, kv_indices: torch.Tensor, key_blocks: int, block_tokens: int,
                    device: torch.device | str):
    """A ``BlockMask`` of full blocks only: query block i reads key blocks ``kv_indices[i, :kv_counts[i]]``.
    kv_counts: (rows,) int, kv_indices: (rows, width <= key_blocks) int (entries past the count are ignored)."""
    from torch.nn.attention.flex_attention import BlockMask

    rows, b = kv_counts.shape[0], block_tokens
    full = torch.zeros(1, 1, rows, key_blocks, dtype=torch.int32)  # as wide as the key blocks; the tail is not read
    full[0, 0, :, : kv_indices.shape[1]] = kv_indices.to(torch.int32).clamp(min=0)
    kwargs = {}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # the transposed (backward-only) tables are not needed
    return BlockMask.from_kv_blocks(
        torch.zeros(1, 1, rows, dtype=torch.int32, device=device),
        torch.zeros(1, 1, rows, key_blocks, dtype=torch.int32, device=device),
        full_kv_num_blocks=kv_counts.to(torch.int32).view(1, 1, rows).to(device),
        full_kv_indices=full.to(device),
        BLOCK_SIZE=b,
        seq_lengths=(rows * b, key_blocks * b),
        **kwargs,
    )


def _compiled_flex() -> Callable:
    if not _COMPILED:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        if getattr(config, name) < RECOMPILE_LIMIT:
            log.info("raising torch._dynamo.config.%s %d -> %d (one flex compile per sequence shape)",
                     name, getattr(config, name), RECOMPILE_LIMIT)
            setattr(config, name, RECOMPILE_LIMIT)
        _COMPILED.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED[0]


def flex_attention_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, out: torch.Tensor | None = None
) -> torch.Tensor:
    """q: (B, H, Sq, D) (the first Sq tokens, whole blocks), k, v: (B, H, S, D) -> (B, H, Sq, D), through compiled
    FlexAttention under the plan's block mask; copied into ``out`` (like q) when given."""
    result = flex_call(q, k, v, block_mask(plan, q.device, q.shape[-2] // plan.block_tokens), plan.block_tokens)
    return result if out is None else out.copy_(result)


def flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, block_tokens: int) -> torch.Tensor:
    """Compiled FlexAttention of q (B, H, Sq, D) over k, v (B, H, S, D) under ``mask`` (a ``BlockMask`` of
    ``block_tokens`` blocks) -> (B, H, Sq, D), scale 1/sqrt(D); on CPU, D < CPU_MIN_HEAD_DIM is zero-padded."""
    kernel_options = None
    if q.device.type == "cuda" and block_tokens < 128:
        kernel_options = {"BLOCK_M": block_tokens, "BLOCK_N": min(64, block_tokens)}
    dim = q.shape[-1]
    pad = CPU_MIN_HEAD_DIM - dim if q.device.type == "cpu" and dim < CPU_MIN_HEAD_DIM else 0
    if pad:  # zero columns add nothing to Q.K^T, and V's zero columns are cut off the output
        q, k, v = (torch.nn.functional.pad(t, (0, pad)) for t in (q, k, v))
    result = _compiled_flex()(q, k, v, block_mask=mask, scale=dim**-0.5, kernel_options=kernel_options)
    return result[..., :dim] if pad else result
