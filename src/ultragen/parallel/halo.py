"""Halo attention: each rank keeps all heads of its windows and receives only the key/value blocks of other ranks that
its query blocks read.

What a rank needs is read from the plan's block table (``kv_indices`` of its query rows), never from window geometry,
so it holds for any policy: with the default one a rank receives the near halves of the windows bordering its run of
windows; a policy in which text reads every hires block makes every rank receive everything (exact, no saving).

Rank r's own sequence is ``[text | its hires shard | guide | received blocks]``: its query rows come first, as
``attend`` wants, and :class:`HaloPlan` holds the block table over that sequence (the global table's rows of r's
query blocks, renumbered). Text and guide rows are replicated, so each rank computes the text rows itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ultragen.attention import Backend, attend
from ultragen.layout import Segment
from ultragen.parallel.context import ProcessGroupContext
from ultragen.parallel.shards import HiresShards
from ultragen.policy import AttentionPlan


@dataclass(frozen=True)
class LocalSequence:
    """What the attention backends read from ``plan.layout`` (block size, block count, sequence length), for a
    rank's own key sequence, which is no image layout."""

    block_tokens: int
    n_blocks: int

    @property
    def seq_tokens(self) -> int:
        return self.n_blocks * self.block_tokens


def query_blocks(plan: AttentionPlan, shards: HiresShards, rank: int, guide_queried: bool) -> torch.Tensor:
    """(n,) int64 global query blocks of ``rank``, in its own sequence's order: text, its hires shard, the guide's
    blocks when their queries are computed (not cached)."""
    b = plan.block_tokens
    text, hires, guide = (plan.query_blocks_of(s) for s in Segment)
    lo, hi = shards.bounds(rank)
    parts = [torch.arange(text.start, text.stop), torch.arange(hires.start + lo // b, hires.start + hi // b)]
    if guide_queried:
        parts.append(torch.arange(guide.start, guide.stop))
    return torch.cat(parts)


def needed_blocks(plan: AttentionPlan, shards: HiresShards, rank: int, guide_queried: bool) -> list[torch.Tensor]:
    """Per source rank s, the ascending global hires blocks held by s that ``rank``'s query blocks read (empty for
    s = rank: those it has)."""
    rows = plan.kv_indices[query_blocks(plan, shards, rank, guide_queried)].long()
    keys = torch.unique(rows[rows >= 0])  # sorted
    hires = plan.query_blocks_of(Segment.HIRES)
    keys = keys[(keys >= hires.start) & (keys < hires.stop)]
    starts = torch.tensor(shards.starts) // plan.block_tokens + hires.start  # first block of each rank, and the end
    owner = torch.bucketize(keys, starts, right=True) - 1
    return [keys[owner == s] if s != rank else keys[:0] for s in range(shards.world)]


@dataclass(frozen=True, eq=False)
class HaloPlan:
    """One rank's share of a halo exchange and the block table over its own sequence."""

    recv_blocks: tuple[torch.Tensor, ...]  # per source rank: global blocks received, ascending
    send_tokens: tuple[torch.Tensor, ...]  # per destination rank: positions in this rank's k / v to send
    plan: AttentionPlan  # over [text | hires shard | guide | received blocks]
    _on_device: dict = field(default_factory=dict, repr=False)

    def send_tokens_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``send_tokens`` on ``device`` (copied once)."""
        if str(device) not in self._on_device:
            self._on_device[str(device)] = tuple(t.to(device) for t in self.send_tokens)
        return self._on_device[str(device)]


def halo_plan(plan: AttentionPlan, shards: HiresShards, rank: int, guide_queried: bool) -> HaloPlan:
    """Rank ``rank``'s halo exchange for ``plan`` (every rank derives every rank's needs from the same table)."""
    b, n_blocks = plan.block_tokens, plan.n_blocks
    text, hires, guide = (plan.query_blocks_of(s) for s in Segment)
    lo, hi = (x // b for x in shards.bounds(rank))
    recv = needed_blocks(plan, shards, rank, guide_queried)
    sends = []
    for dest in range(shards.world):
        theirs = needed_blocks(plan, shards, dest, guide_queried)[rank]  # empty for dest == rank
        local_block = theirs - hires.start - lo + len(text)  # own blocks sit right after the text
        sends.append((local_block[:, None] * b + torch.arange(b)).reshape(-1))
    # global block -> position in [text | shard | guide | received]
    local = torch.full((n_blocks + 1,), -1, dtype=torch.long)  # the extra slot maps the -1 padding to -1
    local[text.start : text.stop] = torch.arange(len(text))
    local[hires.start + lo : hires.start + hi] = torch.arange(hi - lo) + len(text)
    own = len(text) + hi - lo
    local[guide.start : guide.stop] = torch.arange(len(guide)) + own
    received = torch.cat(recv)
    local[received] = torch.arange(len(received)) + own + len(guide)
    total = own + len(guide) + len(received)

    rows = plan.kv_indices[query_blocks(plan, shards, rank, guide_queried)].long()
    mapped = local[torch.where(rows >= 0, rows, n_blocks)]
    if bool(((rows >= 0) & (mapped < 0)).any()):  # cannot happen: every key is text, own, guide or received
        raise RuntimeError("halo plan misses key blocks its queries read; report this as a bug")
    mapped = torch.where(mapped < 0, total, mapped).sort(dim=1).values  # ascending, padding last
    kv = torch.full((total, rows.shape[1]), -1, dtype=torch.int32)
    kv[: len(rows)] = torch.where(mapped == total, -1, mapped).to(torch.int32)
    counts = (kv >= 0).sum(1).to(torch.int32)
    local_plan = AttentionPlan(LocalSequence(b, total), plan.policy, counts, kv)  # type: ignore[arg-type]
    return HaloPlan(tuple(recv), tuple(sends), local_plan)


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, halo: HaloPlan, comm: ProcessGroupContext,
                   backend: Backend | str = Backend.AUTO) -> torch.Tensor:
    """Rank ``comm.rank``'s rows of ``attend`` over the whole sequence.

    q: (B, H, T + n + Gq, D), k, v: (B, H, T + n + G, D) as for :func:`ultragen.parallel.ulysses.ulysses_attention`.
    Sends the (k, v) rows ``halo.send_tokens`` to each rank, receives ``halo.recv_blocks`` and attends over
    ``[k | received]``. Returns (B, H, T + n + Gq, D)."""
    batch, heads, _, dim = q.shape
    b = halo.plan.block_tokens
    chunks = [torch.stack([k[:, :, idx], v[:, :, idx]]) for idx in halo.send_tokens_on(k.device)]
    per_token = 2 * batch * heads * dim
    recv = comm.all_to_all(torch.cat([c.reshape(-1) for c in chunks]), [c.numel() for c in chunks],
                           [len(blocks) * b * per_token for blocks in halo.recv_blocks])
    received = recv.view(2, batch, heads, -1, dim) if comm.world == 1 else torch.cat(
        [c.view(2, batch, heads, -1, dim) for c in recv.split([len(x) * b * per_token for x in halo.recv_blocks])],
        dim=3)
    return attend(q, torch.cat([k, received[0]], dim=2), torch.cat([v, received[1]], dim=2), halo.plan, backend)
