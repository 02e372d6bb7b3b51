"""Which hires tokens each rank holds: a contiguous run of whole windows in window-first order."""

from __future__ import annotations

from dataclasses import dataclass

from ultragen.layout import HierLayout


@dataclass(frozen=True)
class HiresShards:
    """Token ranges of the hires segment over ``world`` ranks. Rank r holds hires tokens ``starts[r]:starts[r+1]``
    (offsets inside the hires segment), windows ``r*W//N`` to ``(r+1)*W//N`` of the W windows: whole windows, so
    whole attention blocks; shard sizes differ by at most one window when W is not a multiple of N."""

    window_tokens: int  # tokens per window (window side squared)
    starts: tuple[int, ...]  # world + 1 offsets into the hires segment

    @classmethod
    def of(cls, layout: HierLayout, world: int) -> HiresShards:
        rows, cols = layout.window_grid
        windows = rows * cols
        if world < 1 or windows < world:
            raise ValueError(
                f"{layout.width_px}x{layout.height_px} px has {windows} windows of {layout.window_tokens}x"
                f"{layout.window_tokens} tokens, fewer than the {world} processes; every process needs at least one "
                f"window: use at most {windows} processes or a larger image"
            )
        per = layout.window_tokens**2
        return cls(per, tuple(r * windows // world * per for r in range(world + 1)))

    @property
    def world(self) -> int:
        return len(self.starts) - 1

    def bounds(self, rank: int) -> tuple[int, int]:
        """(first, end) hires token offsets of ``rank``'s shard."""
        return self.starts[rank], self.starts[rank + 1]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.starts, self.starts[1:]))

    def owner(self, token: int) -> int:
        """The rank holding hires token offset ``token``."""
        for rank in range(self.world):
            if token < self.starts[rank + 1]:
                return rank
        raise ValueError(f"hires token {token} is beyond the {self.starts[-1]} hires tokens")
