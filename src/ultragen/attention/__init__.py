"""Block-sparse attention behind one call, ``attend(q, k, v, plan, backend)``.

Every backend computes the same function: softmax attention in which query block i reads exactly the key blocks
``plan`` allows. ``reference`` is dense masked SDPA (CPU and GPU, O(S^2), the ground truth for tests). A backend
that is asked for by name and cannot run raises with the reason; ``auto`` picks the fastest one that can, and logs
why the others were skipped. ``flex`` checks itself against the reference before its first use on a device, dtype,
head dim and block size (:mod:`ultragen.attention.flex_check`); when it disagrees it cannot run, with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum

import torch

from ultragen.attention.flex import flex_attention_backend, why_not_flex
from ultragen.attention.flex_check import flex_disagrees
from ultragen.attention.reference import reference_attention
from ultragen.attention.triton_bsa import triton_attention, triton_int8_attention, why_not_triton
from ultragen.policy import AttentionPlan

log = logging.getLogger(__name__)


class Backend(str, Enum):
    AUTO = "auto"
    REFERENCE = "reference"  # dense SDPA + the expanded token mask; CPU-capable; O(S^2)
    FLEX = "flex"  # compiled FlexAttention, full-blocks-only BlockMask; CUDA and CPU
    TRITON = "triton"  # own block-sparse Triton kernel, bf16/fp16; CUDA
    TRITON_INT8 = "triton-int8"  # int8 Q.K^T + fp8 P.V (approximate; never picked by auto); CUDA


AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, plan, out=None) -> out

_IMPLS: dict[Backend, AttentionFn] = {
    Backend.REFERENCE: reference_attention,
    Backend.FLEX: flex_attention_backend,
    Backend.TRITON: triton_attention,
    Backend.TRITON_INT8: triton_int8_attention,
}
# fastest exact backend first (ultragen bench attention on an H100); triton-int8 is approximate, so never auto
_AUTO_ORDER: tuple[Backend, ...] = (Backend.TRITON, Backend.FLEX, Backend.REFERENCE)
_BACKEND_CHECKS: dict[Backend, Callable[[torch.Tensor, AttentionPlan], str | None]] = {
    Backend.FLEX: why_not_flex,
    Backend.TRITON: why_not_triton,
    Backend.TRITON_INT8: why_not_triton,
}
# does the backend compute the right thing on this machine? Run only after the cheap checks pass (a check costs a
# compile, once per key and process)
_SELF_CHECKS: dict[Backend, Callable[[torch.Tensor, AttentionPlan], str | None]] = {
    Backend.FLEX: flex_disagrees,
}


def parse_backend(name: Backend | str) -> Backend:
    try:
        return Backend(name)
    except ValueError:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {[b.value for b in Backend]}") from None


def why_not(backend: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> str | None:
    """None when ``backend`` can run these inputs (and, for a self-checking backend, agreed with the reference on
    this machine), else the reason it cannot."""
    return _why_cannot(backend, q, k, v, plan) or _why_wrong(backend, q, plan)


def _why_cannot(backend: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> str | None:
    """The cheap checks: shapes, dtypes, devices and what the backend supports."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] + q.shape[3:] != k.shape[:2] + k.shape[3:]:
        return f"q, k, v must be (B, H, S, D) with one B, H, D, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if k.shape[-2] != plan.layout.seq_tokens:
        return f"sequence of {k.shape[-2]} tokens does not match the plan's {plan.layout.seq_tokens}"
    if q.shape[-2] > k.shape[-2] or q.shape[-2] % plan.block_tokens:
        return (f"{q.shape[-2]} query tokens: queries must be the first whole blocks of the sequence "
                f"(a multiple of {plan.block_tokens}, at most {k.shape[-2]})")
    if q.dtype != k.dtype or k.dtype != v.dtype or q.device != k.device or k.device != v.device:
        return f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on {q.device}/{k.device}/{v.device}"
    if backend not in _IMPLS:
        return "not available in this build"
    check = _BACKEND_CHECKS.get(backend)
    return check(q, plan) if check else None


def _why_wrong(backend: Backend, q: torch.Tensor, plan: AttentionPlan) -> str | None:
    check = _SELF_CHECKS.get(backend)
    return check(q, plan) if check else None


def _why_not_auto(backend: Backend, q: torch.Tensor) -> str | None:
    """Reasons to skip a backend that could run, when picking automatically."""
    if backend is Backend.FLEX and q.device.type == "cpu":
        return "on CPU FlexAttention compiles for every new shape (seconds) and is no faster than the reference"
    return None


def pick_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> Backend:
    for backend in _AUTO_ORDER:
        reason = _why_cannot(backend, q, k, v, plan) or _why_not_auto(backend, q) or _why_wrong(backend, q, plan)
        if reason is None:
            return backend
        log.debug("attention backend %s skipped: %s", backend.value, reason)
    raise RuntimeError("no attention backend can run these inputs; run with logging at DEBUG to see why")


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    backend: Backend | str = Backend.AUTO,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention. k, v: (B, H, S, D), S = plan.layout.seq_tokens; q: (B, H, Sq, D), the first Sq
    positions of the sequence (Sq = S, or fewer whole blocks: e.g. text + hires when the guide rows are cached).
    Any strides with a contiguous last dim.

    Returns (B, H, Sq, D), written into ``out`` when given (like q, any strides with a contiguous last dim, no
    element twice and not overlapping q, k or v: e.g. :func:`heads_last_output`, which the Triton kernels fill in
    place). Scale 1/sqrt(D). q, k, v share dtype and device."""
    backend = parse_backend(backend)
    if out is not None:
        _check_out(out, q, k, v)
    if backend is Backend.AUTO:
        backend = pick_backend(q, k, v, plan)
    elif reason := why_not(backend, q, k, v, plan):
        raise RuntimeError(f"attention backend '{backend.value}' cannot run here: {reason}")
    return _IMPLS[backend](q, k, v, plan, out=out)


def _check_out(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be like q ({tuple(q.shape)}, {q.dtype}, {q.device}, last dim contiguous), got "
                         f"{tuple(out.shape)}, {out.dtype}, {out.device}, strides {out.stride()}")
    if out.numel() == 0:
        return
    if _self_overlapping(out):
        raise ValueError(f"out has overlapping elements (strides {out.stride()}, e.g. from expand); pass a fresh "
                         "buffer such as heads_last_output(q)")
    if any(_byte_ranges_meet(out, t) for t in (q, k, v)):
        raise ValueError("out overlaps q, k or v in memory; pass a fresh buffer such as heads_last_output(q)")


def _self_overlapping(t: torch.Tensor) -> bool:
    """True when two indices of ``t`` can address one element (a zero stride, or strides too small for the sizes)."""
    extent = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride < extent:
            return True
        extent = stride * size
    return False


def _byte_ranges_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors intersect (a conservative test: spans, not elements)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((n - 1) * s for s, n in zip(t.stride(), t.shape))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def heads_last_output(q: torch.Tensor) -> torch.Tensor:
    """An output buffer for q (B, H, Sq, D) stored as (B, Sq, H, D): the (B, H, Sq, D) view that :func:`attend`
    fills, whose ``.transpose(1, 2).flatten(2, 3)`` (what a FLUX block does next) is a view, not a copy."""
    batch, heads, rows, dim = q.shape
    return q.new_empty(batch, rows, heads, dim).transpose(1, 2)


__all__ = ["Backend", "attend", "heads_last_output", "parse_backend", "pick_backend", "why_not"]
