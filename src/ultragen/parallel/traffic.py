"""Bytes each rank sends per denoising step, for each mode: what the bench reports next to the time per step.

Counted from the same shard and block-table arithmetic the exchange uses; the collectives count what they actually
send (``ProcessGroupContext.bytes_sent``), and the tests hold the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from ultragen.parallel.context import ParallelMode, parse_parallel_mode
from ultragen.parallel.halo import needed_blocks
from ultragen.parallel.shards import HiresShards
from ultragen.policy import AttentionPlan


@dataclass(frozen=True)
class Traffic:
    """Bytes sent by each rank to the other ranks in one transformer forward (one step of one CFG branch)."""

    mode: ParallelMode
    world: int
    attention_bytes: tuple[int, ...]  # per rank, all attention calls of the forward together
    gather_bytes: tuple[int, ...]  # per rank, the all-gather of the output velocity

    @property
    def per_rank_bytes(self) -> tuple[int, ...]:
        return tuple(a + g for a, g in zip(self.attention_bytes, self.gather_bytes))

    @property
    def total_bytes(self) -> int:
        return sum(self.per_rank_bytes)

    @property
    def max_rank_bytes(self) -> int:
        """The busiest rank's bytes: what bounds the step's communication time."""
        return max(self.per_rank_bytes)


def attention_call_bytes(plan: AttentionPlan, world: int, mode: ParallelMode | str, heads: int, head_dim: int,
                         batch: int = 1, elem_bytes: int = 2, guide_queried: bool = False) -> tuple[int, ...]:
    """Bytes each rank sends in one attention call (q, k, v of ``heads`` x ``head_dim`` in ``elem_bytes``).

    Ulysses, rank r with n_r hires rows, G = heads / N: out ``3 B G D e n_r (N-1)`` (q, k, v to the other head groups),
    back ``B G D e sum_{j != r} (T + Gq + n_j)`` (each rank's hires rows plus the replicated text and computed guide
    rows). Halo: ``2 B H D e`` per key token another rank's queries read from r's windows."""
    mode = parse_parallel_mode(mode)
    shards = HiresShards.of(plan.layout, world)
    sizes = shards.sizes
    if mode is ParallelMode.ULYSSES:
        group = heads // world
        text = plan.layout.text_tokens
        gq = plan.layout.guide_tokens if guide_queried else 0
        unit = batch * group * head_dim * elem_bytes
        back = [sum(text + gq + sizes[j] for j in range(world) if j != r) for r in range(world)]
        return tuple(3 * unit * sizes[r] * (world - 1) + unit * back[r] for r in range(world))
    per_token = 2 * batch * heads * head_dim * elem_bytes
    sent = [0] * world
    for dest in range(world):
        for src, blocks in enumerate(needed_blocks(plan, shards, dest, guide_queried)):
            sent[src] += len(blocks) * plan.block_tokens * per_token
    return tuple(sent)


def step_traffic(plan: AttentionPlan, world: int, mode: ParallelMode | str, *, heads: int, head_dim: int,
                 layers: int, out_channels: int, batch: int = 1, elem_bytes: int = 2,
                 guide_queried: bool = False) -> Traffic:
    """Bytes per rank for one forward of ``layers`` attention layers (FLUX.1: 19 double + 38 single = 57), plus the
    output all-gather (``out_channels`` per token, padded to the largest shard: ``(N-1) B max(n) C e``)."""
    per_call = attention_call_bytes(plan, world, mode, heads, head_dim, batch, elem_bytes, guide_queried)
    longest = max(HiresShards.of(plan.layout, world).sizes)
    gather = (world - 1) * batch * longest * out_channels * elem_bytes
    return Traffic(parse_parallel_mode(mode), world, tuple(layers * b for b in per_call), (gather,) * world)
