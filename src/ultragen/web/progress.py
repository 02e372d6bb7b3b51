"""One progress bar per stage (text, guide, hires steps, decode) with the time left, rendered as HTML.

A stage starts when the one before it ends (the first when the job starts); its time left is its elapsed time per
finished unit times the units still to do. The HTML carries ``data-stage``, ``data-done`` and ``data-total`` on each
bar so that a test (or a script) can read the state without parsing the text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

STAGES = {"encode": "Text", "guide": "Guide", "hires": "Hires steps", "decode": "Decode"}


def stage_key(stage: str) -> str:
    """The bar a pipeline stage name feeds: "hires0", "hires1" (a cascade) all feed "hires"."""
    return "hires" if stage.startswith("hires") else stage


@dataclass
class _Bar:
    done: int = 0
    total: int = 0
    started_s: float | None = None
    ended_s: float | None = None


class StageProgress:
    """The bars of one job. ``update(stage, done, total)`` as events arrive; ``html()`` to show them."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._bars = {key: _Bar() for key in STAGES}
        self._last_end_s = clock()

    def update(self, stage: str, done: int, total: int) -> None:
        key = stage_key(stage)
        bar = self._bars[key]
        now = self._clock()
        if bar.started_s is None:
            bar.started_s = self._last_end_s
        if stage != key and bar.ended_s is not None:  # the next cascade level: the bar counts on
            bar.ended_s = None
        bar.done, bar.total = done, total
        if done >= total:
            bar.ended_s = self._last_end_s = now

    def seconds_left(self, stage: str) -> float | None:
        """Estimated seconds until ``stage`` ends; None before its first unit is done, 0 once it has ended."""
        bar = self._bars[stage_key(stage)]
        if bar.ended_s is not None:
            return 0.0
        if bar.started_s is None or bar.done == 0:
            return None
        per_unit = (self._clock() - bar.started_s) / bar.done
        return per_unit * (bar.total - bar.done)

    def fraction(self, stage: str) -> float:
        bar = self._bars[stage_key(stage)]
        return bar.done / bar.total if bar.total else 0.0

    def html(self) -> str:
        rows = []
        for key, label in STAGES.items():
            bar = self._bars[key]
            left = self.seconds_left(key)
            if bar.ended_s is not None:
                note = f"done in {bar.ended_s - bar.started_s:.1f} s"
            elif left is not None:
                note = f"{left:.0f} s left"
            else:
                note = "waiting"
            count = f"{bar.done}/{bar.total}" if bar.total else ""
            rows.append(
                f'<div class="ug-stage" data-stage="{key}" data-done="{bar.done}" data-total="{bar.total}">'
                f'<span class="ug-label">{label}</span>'
                f'<progress max="{max(bar.total, 1)}" value="{bar.done}"></progress>'
                f'<span class="ug-note">{count} {note}</span></div>'
            )
        return f'<div class="ug-progress">{"".join(rows)}</div>'


EMPTY_HTML = StageProgress().html()
