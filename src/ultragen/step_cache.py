"""Step caching for the hierarchical pass: skip most of the transformer in steps that change little.

First-Block-Cache (ParaAttention; diffusers ``FirstBlockCacheConfig``), written for our own block loop: every step
runs the first block; the relative L1 change of its hires residual (output - input of that block) against the one
of the last fully computed step decides. Below ``threshold`` the remaining blocks are skipped and the residual they
added in that last computed step is added to the first block's output instead. diffusers' hooks cannot be used
here: they wrap the blocks' ``forward``, which our forward never calls (it runs the blocks' modules through its own
block functions, ``ultragen.flux.blocks`` / ``ultragen.flux2.blocks``); docs/design.md, "Step caching".

Family-free: a hierarchical transformer hands :meth:`StepCache.run` its input hires tokens and two callables (the
first block, the rest); this module never sees a block.

State. One :class:`StepCache` per image (the pipeline makes a fresh one, or calls :meth:`StepCache.reset`). Inside
it, one state per *branch*, told apart by the prompt embeddings the transformer got: CFG's two calls per step keep
two states and decide separately (as diffusers' "cond"/"uncond" contexts do). A call with another plan, hires shape,
dtype or device resets it (a new image size or cascade level starts clean).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch


class CacheKind(str, Enum):
    """``off``: every step runs every block. ``fbcache``: First-Block-Cache."""

    OFF = "off"
    FBCACHE = "fbcache"


# threshold used when only the name is given: ParaAttention's FLUX.1 example (0.08; 0.12 is their faster setting).
# Not a measured choice for our hires pass; the testbed eval must decide it (docs/design.md, "Step caching").
DEFAULT_THRESHOLDS = {CacheKind.FBCACHE: 0.08}
MAX_THRESHOLD = 1e6  # large enough to skip every step after the first (tests), small enough to catch typos like 1e9


@dataclass(frozen=True)
class StepCacheConfig:
    """``kind``: a :class:`CacheKind`; ``threshold``: relative L1 change of the first block's residual below which a
    step reuses the cached residual (0: never skip; ``off`` takes none)."""

    kind: CacheKind = CacheKind.OFF
    threshold: float = 0.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", CacheKind(self.kind))
        except ValueError:
            raise ValueError(_bad_name(self.kind)) from None
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"step cache threshold {self.threshold!r} must be a number, e.g. fbcache:0.08")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.kind is CacheKind.OFF and self.threshold != 0:
            raise ValueError(f"cache 'off' takes no threshold (got {self.threshold:g}); write just: off")
        if not (math.isfinite(self.threshold) and 0 <= self.threshold <= MAX_THRESHOLD):
            raise ValueError(f"step cache threshold {self.threshold!r} must be a number in [0, {MAX_THRESHOLD:g}] "
                             f"(0: never skip; ParaAttention uses 0.08 for FLUX.1), e.g. fbcache:0.08")

    @property
    def enabled(self) -> bool:
        return self.kind is not CacheKind.OFF

    def __str__(self) -> str:
        return self.kind.value if not self.enabled else f"{self.kind.value}:{self.threshold:g}"


def _bad_name(name) -> str:
    names = ", ".join(k.value for k in CacheKind)
    return f"unknown step cache {name!r}; use one of: {names} (with a threshold: fbcache:0.08)"


def parse_cache(text: str | StepCacheConfig) -> StepCacheConfig:
    """``"off"``, ``"fbcache"`` (its default threshold) or ``"fbcache:0.1"`` -> :class:`StepCacheConfig`.
    ValueError with a one-line message otherwise."""
    if isinstance(text, StepCacheConfig):
        return text
    if not isinstance(text, str):
        raise ValueError(f"step cache {text!r} must be text like off, fbcache or fbcache:0.08")
    name, sep, value = text.strip().partition(":")
    name = name.strip().lower()
    if name not in {k.value for k in CacheKind}:
        raise ValueError(_bad_name(name))
    kind = CacheKind(name)
    if not sep:
        return StepCacheConfig(kind, DEFAULT_THRESHOLDS.get(kind, 0.0))
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"step cache threshold {value.strip()!r} in {text!r} is not a number; e.g. "
                         f"{name}:0.08") from None
    return StepCacheConfig(kind, threshold)


@dataclass
class _Branch:
    """One CFG branch: its key (copies of the prompt tensors) and the last fully computed step's residuals."""

    key: tuple[torch.Tensor, ...]
    head: torch.Tensor | None = None  # (B, hires_tokens, D): first block's output - its input
    tail: torch.Tensor | None = None  # (B, hires_tokens, D): all blocks' output - the first block's output


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y) for x, y in zip(a, b))


class StepCache:
    """First-Block-Cache state of one image (all its steps and CFG branches). ``computed`` / ``skipped``: steps
    (transformer calls) that ran every block / reused the cached residual, since the last reset."""

    def __init__(self, config: StepCacheConfig | str = StepCacheConfig()):
        self.config = parse_cache(config)
        self.reset()

    def reset(self) -> None:
        """Forget every branch's residuals and the counts (call before each image)."""
        self._context: tuple | None = None
        self._branches: list[_Branch] = []
        self.computed = 0
        self.skipped = 0

    def active(self) -> bool:
        """Whether a forward should route its blocks through :meth:`run` (on, and no gradients: never in training)."""
        return self.config.enabled and not torch.is_grad_enabled()

    def stats(self) -> dict:
        """For an image's record: the setting and the step counts."""
        return {"cache": str(self.config), "steps_computed": self.computed, "steps_skipped": self.skipped}

    def run(self, plan: object, prompt: tuple[torch.Tensor, ...], hires: torch.Tensor,
            head: Callable[[], object], tail: Callable[[object], object],
            hires_of: Callable[[object], torch.Tensor]) -> torch.Tensor:
        """The hires stream after every block, or after the first block plus the cached rest.

        ``plan``: the attention plan of this call (another plan object, or another hires shape, dtype or device,
        resets the cache); ``prompt``: the prompt tensors of this call (they pick its branch); ``hires``: (B, tokens,
        D) the first block's hires input; ``head()``: runs the first block, returns its streams; ``tail(streams)``:
        runs the remaining blocks; ``hires_of(streams)``: the hires tensor (B, tokens, D) of some streams."""
        context = (tuple(hires.shape), hires.dtype, hires.device)
        if self._context is None or self._context[0] is not plan or self._context[1:] != context:
            self.reset()
            self._context = (plan, *context)
        branch = self._branch(prompt)
        streams = head()
        first = hires_of(streams)
        residual = first - hires
        if self._should_skip(branch, residual):
            self.skipped += 1
            return first + branch.tail
        out = hires_of(tail(streams))
        branch.head, branch.tail = residual, out - first
        self.computed += 1
        return out

    def _branch(self, prompt: tuple[torch.Tensor, ...]) -> _Branch:
        for branch in self._branches:
            if _same(branch.key, prompt):
                return branch
        branch = _Branch(tuple(p.detach().clone() for p in prompt))
        self._branches.append(branch)
        return branch

    def _should_skip(self, branch: _Branch, residual: torch.Tensor) -> bool:
        if branch.head is None:
            return False
        change = (residual - branch.head).abs().float().mean() / branch.head.abs().float().mean()
        return bool(change.item() < self.config.threshold)  # NaN (an all-zero residual) never skips
