"""``SequenceParallel``: what ``HierFluxTransformer(..., parallel=...)`` calls to run its hires pass over N ranks.

The transformer's forward takes the whole (replicated) hires input on every rank and calls, in order:
:meth:`~SequenceParallel.scatter_hires` (this rank's windows), :meth:`~SequenceParallel.local_rope` (the rotary rows of
``[text | shard | guide]``), :meth:`~SequenceParallel.attention` (the attention function its blocks call, Ulysses or
halo) and :meth:`~SequenceParallel.gather_hires` (every rank's output, so the sampler continues replicated). Everything
else in a block is per token, so it runs unchanged on the shard. The guide pass (once per image) runs replicated:
its keys/values are then on every rank without traffic.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ultragen.attention import Backend
from ultragen.attention.op import plan_key
from ultragen.layout import HierLayout
from ultragen.parallel.context import ParallelMode, ProcessGroupContext, parse_parallel_mode
from ultragen.parallel.halo import HaloPlan, halo_attention, halo_plan
from ultragen.parallel.shards import HiresShards
from ultragen.parallel.ulysses import ulysses_attention
from ultragen.policy import AttentionPlan

Rope = tuple[torch.Tensor, torch.Tensor]

_LIVE: dict[int, tuple] = {}  # key -> (weakref to SequenceParallel, plan, backend), for the custom op
_KEYS: dict[tuple, int] = {}  # (context id, plan content key, backend) -> key: equal plans share a compiled graph


class SequenceParallel:
    """Sequence parallelism of the hierarchical pass over ``comm``'s ranks, in ``mode`` (``ulysses`` or ``halo``).
    Inference only (the collectives carry no gradients)."""

    def __init__(self, comm: ProcessGroupContext, mode: ParallelMode | str = ParallelMode.ULYSSES):
        self.comm = comm
        self.mode = parse_parallel_mode(mode)
        self._shards: dict[HierLayout, HiresShards] = {}
        self._ropes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # plan -> (rope id, local rope)
        self._halos: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # plan -> {guide_queried: HaloPlan}

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world(self) -> int:
        return self.comm.world

    def shards(self, layout: HierLayout) -> HiresShards:
        if layout not in self._shards:
            self._shards[layout] = HiresShards.of(layout, self.world)
        return self._shards[layout]

    def bounds(self, plan: AttentionPlan) -> tuple[int, int]:
        """(first, end) hires token offsets this rank holds."""
        return self.shards(plan.layout).bounds(self.rank)

    # --- the hooks HierFluxTransformer calls ------------------------------------------------------------------------
    def scatter_hires(self, hires: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """(B, hires_tokens, C), the same on every rank -> (B, n, C), this rank's windows."""
        lo, hi = self.bounds(plan)
        return hires[:, lo:hi]

    def gather_hires(self, local: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """(B, n, C) of every rank -> (B, hires_tokens, C) on every rank (padded to the largest shard for the
        all-gather, which gloo needs even)."""
        sizes = self.shards(plan.layout).sizes
        longest = max(sizes)
        padded = torch.nn.functional.pad(local, (0, 0, 0, longest - local.shape[1]))
        parts = self.comm.all_gather(padded.contiguous())
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)

    def local_rope(self, rope: Rope, plan: AttentionPlan) -> Rope:
        """The rotary (cos, sin) rows (S, D) of ``[text | this rank's shard | guide]`` out of the whole sequence's."""
        cached = self._ropes.get(plan)
        if cached is None or cached[0] is not rope[0]:
            _, hires0, guide0, end = plan.layout.segment_offsets
            lo, hi = self.bounds(plan)
            rows = torch.cat([torch.arange(hires0), torch.arange(hires0 + lo, hires0 + hi),
                              torch.arange(guide0, end)]).to(rope[0].device)
            cached = (rope[0], (rope[0][rows], rope[1][rows]))
            self._ropes[plan] = cached
        return cached[1]

    def attention(self, plan: AttentionPlan, backend: Backend | str, compiled: bool = False) -> Callable:
        """``attention(q, k, v)`` for the blocks: q (B, H, T + n + Gq, D), k, v (B, H, T + n + G, D), this rank's
        rows; returns this rank's rows of the whole sequence's attention. ``compiled``: through a custom op, opaque
        to ``torch.compile`` (like ``ultragen::attend``)."""
        backend = Backend(backend).value
        if compiled:
            key = _KEYS.setdefault((id(self), plan_key(plan), backend), len(_KEYS))
            _LIVE[key] = (weakref.ref(self), plan, backend)  # the latest plan with this table

            def opaque(q, k, v):
                return sequence_parallel_attend(q, k, v, key)

            return opaque
        return lambda q, k, v: self.attend(q, k, v, plan, backend)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
               backend: Backend | str) -> torch.Tensor:
        if q.requires_grad or k.requires_grad or v.requires_grad:
            raise RuntimeError("sequence-parallel attention is inference only; run under torch.no_grad() or use one "
                               "process for training")
        shards = self.shards(plan.layout)
        if self.mode is ParallelMode.ULYSSES:
            return ulysses_attention(q, k, v, plan, shards, self.comm, backend)
        lo, hi = shards.bounds(self.rank)
        guide_queried = q.shape[2] > plan.layout.text_tokens + hi - lo
        return halo_attention(q, k, v, self.halo(plan, guide_queried), self.comm, backend)

    def halo(self, plan: AttentionPlan, guide_queried: bool) -> HaloPlan:
        per_plan = self._halos.setdefault(plan, {})
        if guide_queried not in per_plan:
            per_plan[guide_queried] = halo_plan(plan, self.shards(plan.layout), self.rank, guide_queried)
        return per_plan[guide_queried]

    def same_everywhere(self, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """``tensors`` as rank 0 has them, on every rank (stage A's guide and the prompt: every rank computed them,
        but the hires pass needs them bit-identical, which kernels need not guarantee across devices); None stays
        None (a family without a pooled prompt)."""
        return tuple(None if t is None else self.comm.broadcast(t.contiguous()) for t in tensors)

    def writes_files(self) -> bool:
        """Wait until every rank gets here (fails if one died); True on rank 0, the one rank that writes."""
        return self.comm.all_ok(True) and self.rank == 0


@torch.library.custom_op("ultragen::sequence_parallel_attend", mutates_args=())
def sequence_parallel_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int) -> torch.Tensor:
    """:meth:`SequenceParallel.attend` for the context and plan registered under ``key``."""
    ref, plan, backend = _LIVE[key]
    parallel = ref()
    if parallel is None:
        raise RuntimeError("the SequenceParallel context of this compiled attention is gone; keep it referenced")
    return parallel.attend(q, k, v, plan, backend).contiguous()


@sequence_parallel_attend.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
