"""Showing the timestamps that arrive on the bus (`updated_at`, `started_at`, `since` …).

They come from other nodes' clocks, so any finite number may arrive: the protocol refuses
only NaN, infinities and negative values (a message is not dropped for a wrong clock: its
other fields matter more). A value no datetime can hold is shown as the number it is,
marked, and showing one never raises.
"""

from __future__ import annotations

import math
import time
from datetime import datetime


def clock(seconds: float | None, millis: bool = False) -> str:
    """Local time of day (to the millisecond with `millis`); "" for an unset time."""
    if not seconds:
        return ""
    try:
        shown = datetime.fromtimestamp(seconds).strftime("%H:%M:%S.%f" if millis else "%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g} (not a valid time)"
    return shown[:-3] if millis else shown


def ago(seconds: float) -> str:
    """How long before now, in the largest whole unit; a time ahead of now says so."""
    if not math.isfinite(seconds):
        return "at no valid time"
    elapsed = time.time() - seconds
    if elapsed < -1.0:  # a clock ahead of ours
        return "in the future"
    elapsed = max(0.0, elapsed)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if elapsed >= size:
            return f"{elapsed / size:.0f} {unit} ago"
    return f"{elapsed:.0f} s ago"
