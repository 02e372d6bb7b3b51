"""Block-sparse attention behind one call, ``attend(q, k, v, plan, backend)``.

Every backend computes the same function: softmax attention in which query block i reads exactly the key blocks
``plan`` allows. ``reference`` is dense masked SDPA (CPU and GPU, O(S^2), the ground truth for tests). A backend
that is asked for by name and cannot run raises with the reason; ``auto`` picks the fastest one that can, and logs
why the others were skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum

import torch

from ultragen.attention.reference import reference_attention
from ultragen.policy import AttentionPlan

log = logging.getLogger(__name__)


class Backend(str, Enum):
    AUTO = "auto"
    REFERENCE = "reference"  # dense SDPA + the expanded token mask; CPU-capable; O(S^2)


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionPlan], torch.Tensor]

_IMPLS: dict[Backend, AttentionFn] = {Backend.REFERENCE: reference_attention}
_AUTO_ORDER: tuple[Backend, ...] = (Backend.REFERENCE,)  # fastest first


def parse_backend(name: Backend | str) -> Backend:
    try:
        return Backend(name)
    except ValueError:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {[b.value for b in Backend]}") from None


def why_not(backend: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> str | None:
    """None when ``backend`` can run these inputs, else the reason it cannot."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] + q.shape[3:] != k.shape[:2] + k.shape[3:]:
        return f"q, k, v must be (B, H, S, D) with one B, H, D, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if k.shape[-2] != plan.layout.seq_tokens:
        return f"sequence of {k.shape[-2]} tokens does not match the plan's {plan.layout.seq_tokens}"
    if q.shape[-2] > k.shape[-2] or q.shape[-2] % plan.block_tokens:
        return (f"{q.shape[-2]} query tokens: queries must be the first whole blocks of the sequence "
                f"(a multiple of {plan.block_tokens}, at most {k.shape[-2]})")
    if backend not in _IMPLS:
        return "not available in this build"
    return None


def pick_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> Backend:
    for backend in _AUTO_ORDER:
        reason = why_not(backend, q, k, v, plan)
        if reason is None:
            return backend
        log.debug("attention backend %s skipped: %s", backend.value, reason)
    raise RuntimeError("no attention backend can run these inputs; run with logging at DEBUG to see why")


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, backend: Backend | str = Backend.AUTO
) -> torch.Tensor:
    """Block-sparse attention. k, v: (B, H, S, D), S = plan.layout.seq_tokens; q: (B, H, Sq, D), the first Sq
    positions of the sequence (Sq = S, or fewer whole blocks: e.g. text + hires when the guide rows are cached).

    Returns (B, H, Sq, D). Scale 1/sqrt(D). q, k, v share dtype and device."""
    backend = parse_backend(backend)
    if backend is Backend.AUTO:
        backend = pick_backend(q, k, v, plan)
    elif reason := why_not(backend, q, k, v, plan):
        raise RuntimeError(f"attention backend '{backend.value}' cannot run here: {reason}")
    return _IMPLS[backend](q, k, v, plan)


__all__ = ["Backend", "attend", "parse_backend", "pick_backend", "why_not"]
