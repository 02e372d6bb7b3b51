"""Ulysses attention: an all-to-all from a sequence shard to a head shard, the whole plan on H/N heads, and back.

Rank r holds the text and guide rows (replicated on every rank: they are identical there) and its shard of hires
rows, for all H heads. The hires rows go through one all-to-all that leaves rank r with every hires row for heads
``r*H/N .. (r+1)*H/N``; its text and guide rows for those heads it already has (a slice, no traffic). It then runs the
block-sparse ``attend`` on the whole sequence and plan for its heads, exactly what one process computes for them.
The second all-to-all sends each rank its hires rows back, for all heads, and with them every head group's text
(and computed guide) rows, which every rank needs whole because its text stream continues replicated.
"""

from __future__ import annotations

import torch

from ultragen.attention import Backend, attend
from ultragen.parallel.context import ProcessGroupContext
from ultragen.parallel.shards import HiresShards
from ultragen.policy import AttentionPlan


def check_heads(heads: int, world: int) -> None:
    """Raise ValueError unless ``heads`` split evenly over ``world`` ranks (Ulysses shards heads)."""
    if heads % world:
        fits = [n for n in range(2, heads + 1) if heads % n == 0]
        raise ValueError(f"{heads} attention heads do not split over {world} processes: Ulysses gives every process "
                         f"heads/N of them; use --nproc-per-node in {fits} or --parallel halo")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, shards: HiresShards,
                      comm: ProcessGroupContext, backend: Backend | str = Backend.AUTO) -> torch.Tensor:
    """Rank ``comm.rank``'s rows of ``attend`` over the whole sequence.

    q: (B, H, T + n + Gq, D), k, v: (B, H, T + n + G, D): text T, this rank's n hires rows, then the guide's G key rows
    (Gq = G when the guide's query rows are computed, 0 when its keys/values are cached). Returns (B, H, T + n + Gq, D).
    """
    batch, heads, _, dim = q.shape
    world, rank = comm.world, comm.rank
    check_heads(heads, world)
    group = heads // world
    text = plan.layout.text_tokens
    lo, hi = shards.bounds(rank)
    n = hi - lo
    mine = slice(rank * group, (rank + 1) * group)

    # sequence shard -> head shard: to rank j, this rank's hires q, k, v for j's heads
    hires = torch.stack([t[:, :, text : text + n] for t in (q, k, v)])  # (3, B, H, n, D)
    send = hires.unflatten(2, (world, group)).permute(2, 0, 1, 3, 4, 5).reshape(-1)  # (N, 3, B, H/N, n, D) flat
    row = 3 * batch * group * dim
    recv = comm.all_to_all(send, [row * n] * world, [row * s for s in shards.sizes])
    pieces = [c.view(3, batch, group, -1, dim) for c in recv.split([row * s for s in shards.sizes])]
    full = torch.cat(pieces, dim=3)  # (3, B, H/N, hires_tokens, D)
    qf, kf, vf = (torch.cat([t[:, mine, :text], full[i], t[:, mine, text + n :]], dim=2)
                  for i, t in enumerate((q, k, v)))
    out = attend(qf, kf, vf, plan, backend)  # (B, H/N, T + hires + Gq, D)

    # head shard -> sequence shard: to rank j, its hires rows and all replicated rows, for this rank's heads
    hires_tokens = shards.starts[-1]
    replicated = torch.cat([out[:, :, :text], out[:, :, text + hires_tokens :]], dim=2)  # (B, H/N, T + Gq, D)
    chunks = [torch.cat([replicated, out[:, :, text + a : text + b]], dim=2) for a, b in
              (shards.bounds(j) for j in range(world))]
    back = comm.all_to_all(torch.cat([c.reshape(-1) for c in chunks]), [c.numel() for c in chunks],
                           [chunks[rank].numel()] * world)
    res = back.view(world, batch, group, -1, dim).permute(1, 0, 2, 3, 4).reshape(batch, heads, -1, dim)
    rep = replicated.shape[2]
    return torch.cat([res[:, :, :text], res[:, :, rep:], res[:, :, text:rep]], dim=2)
