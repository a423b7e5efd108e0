"""Durations as people write them in flags and settings: `90s`, `15m`, `12h`, `7d`, or a
plain number of seconds."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = 36500 * 86400.0  # a hundred years: any longer is a typo, not a retention
_DURATION = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,9})?)([smhd]?)")


def parse_duration(text: str) -> float:
    """Seconds in `text`; ValueError naming the accepted forms (or the limit) otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: give seconds, or a number with a unit "
            "s, m, h or d (90s, 15m, 12h, 7d)"
        )
    seconds = float(match[1]) * UNITS[match[2]]
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {text!r} is over the limit of 36500d")
    return seconds


def _duration(value: object) -> object:
    """A duration given as text is parsed; a number is taken as seconds (checked by its field)."""
    return parse_duration(value) if isinstance(value, str) else value


# A field of seconds that settings files and FLOTTA_* variables may also give as `7d`.
Duration = Annotated[float, BeforeValidator(_duration)]
