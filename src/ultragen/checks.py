"""The range checks of numeric settings, shared by every config dataclass: value + rule in one ValueError.

``check_int("steps", 0, 1, 1000)`` raises ``steps=0 must be a whole number in [1, 1000]``; the config that calls it
names the setting as the user wrote it, so the message says which value to change.
"""

from __future__ import annotations

import math


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """``value`` must be an int (not a bool) in ``[low, high]`` (``high`` None: no upper bound)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be a whole number {rule}")


def check_float(name: str, value, low: float, high: float, *, low_open: bool = False) -> None:
    """``value`` must be a finite real number (not a bool) in ``[low, high]``, or ``(low, high]`` if ``low_open``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        raise ValueError(f"{name}={value!r} must be a number in {'(' if low_open else '['}{low}, {high}]")
