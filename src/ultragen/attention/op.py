"""``attend`` as a PyTorch custom operator, so a ``torch.compile``d transformer block treats block-sparse attention
as one opaque call (no graph break, no tracing into Triton or into the plan's Python objects).

The plan travels as an integer key into a registry of live plans; under ``torch.compile(dynamic=False)`` the key is
a constant that dynamo guards on, so the key is a function of the plan's content (its block table), not of the
object: the new plan that each image builds for the same layout and policy reuses the compiled graphs instead of
recompiling them (dynamo falls back to eager, silently, after its recompile limit).
"""

from __future__ import annotations

import hashlib
import weakref

import torch

from ultragen.policy import AttentionPlan

_PLANS: dict[int, weakref.WeakSet[AttentionPlan]] = {}  # key -> the live plans with that table (any one will do)
_KEY_OF: weakref.WeakKeyDictionary[AttentionPlan, int] = weakref.WeakKeyDictionary()
_KEYS: dict[bytes, int] = {}  # block-table digest -> key; one entry per distinct table seen in this process


def plan_key(plan: AttentionPlan) -> int:
    """Register ``plan`` (weakly) and return its key: equal for plans with equal block tables."""
    key = _KEY_OF.get(plan)
    if key is None:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{plan.block_tokens}/{plan.layout.seq_tokens}/{tuple(plan.kv_indices.shape)}".encode())
        digest.update(plan.kv_counts.cpu().numpy().tobytes())
        digest.update(plan.kv_indices.cpu().numpy().tobytes())
        key = _KEY_OF[plan] = _KEYS.setdefault(digest.digest(), len(_KEYS))
    _PLANS.setdefault(key, weakref.WeakSet()).add(plan)
    return key


@torch.library.custom_op("ultragen::attend", mutates_args=())
def attend_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int, backend: str) -> torch.Tensor:
    """``ultragen.attention.attend(q, k, v, plan, backend)`` for the plan registered under ``key``."""
    from ultragen.attention import attend, heads_last_output

    plan = next(iter(_PLANS.get(key, ())), None)
    if plan is None:
        raise RuntimeError(f"attention plan {key} is no longer alive; keep the plan referenced while it is used")
    # no copies: the backends take any strides with a contiguous last dim (q arrives as a (B, S, H, D) transpose),
    # and the output is stored heads-last, so the block's reshape to (B, Sq, H*D) after this call is a view
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return attend(q, k, v, plan, backend, out=heads_last_output(q))


@attend_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int, backend: str) -> torch.Tensor:
    from ultragen.attention import heads_last_output

    return heads_last_output(q)  # the real output's strides: inductor lays out what follows by these
