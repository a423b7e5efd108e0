"""The duration parser of flags and settings: `90s`, `15m`, `12h`, `7d` or seconds, and a
one-line error naming the accepted forms for anything else."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flotta_mqtt.model.durations import MAX_DURATION, UNITS, parse_duration

FORMS = "give seconds, or a number with a unit s, m, h or d (90s, 15m, 12h, 7d)"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("7d", 604800),
        ("3600", 3600),
        ("0", 0),
        ("1.5h", 5400),
        (" 2d ", 172800),
        ("36500d", MAX_DURATION),
    ],
)
def test_the_documented_forms(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "d", "7x", "7 d", "-1", "+5", "1e3", "inf", "nan", "7D", "1h30m", "1.", ".5", "٣"],
)
def test_anything_else_is_refused_naming_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid duration {text!r}: {FORMS}")):
        parse_duration(text)


@given(amount=st.integers(0, 10**6), unit=st.sampled_from(sorted(UNITS)))
def test_a_whole_number_with_a_unit_is_that_many_units(amount: int, unit: str) -> None:
    seconds = amount * UNITS[unit]
    if seconds > MAX_DURATION:
        with pytest.raises(ValueError, match="over the limit of 36500d"):
            parse_duration(f"{amount}{unit}")
    else:
        assert parse_duration(f"{amount}{unit}") == seconds


@given(seconds=st.floats(0, MAX_DURATION, allow_nan=False))
def test_seconds_written_out_come_back(seconds: float) -> None:
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-9, abs=1e-9)


@given(text=st.text(max_size=30))
def test_any_text_is_a_duration_within_the_limit_or_a_clear_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        assert str(exc).startswith((f"invalid duration {text!r}", f"duration {text!r}"))
        assert "\n" not in str(exc)
    else:
        assert 0 <= seconds <= MAX_DURATION
