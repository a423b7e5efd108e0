"""Timestamps from the bus are shown whatever their value, never raising."""

from __future__ import annotations

import math
import time

import pytest

from flotta_mqtt.client.times import ago, clock

ODD = [1e12, 1e20, 1.7e308, -5.0, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("seconds", ODD)
def test_an_odd_timestamp_is_shown_not_raised_on(seconds: float) -> None:
    assert clock(seconds) and clock(seconds, millis=True)
    assert ago(seconds)


def test_a_time_no_datetime_holds_is_shown_as_its_number() -> None:
    assert clock(1e20) == "1e+20 (not a valid time)"


def test_an_ordinary_time_is_a_time_of_day() -> None:
    now = time.time()
    assert len(clock(now)) == len("12:34:56")
    assert len(clock(now, millis=True)) == len("12:34:56.789")
    assert clock(None) == "" and clock(0.0) == ""


def test_ago_counts_back_and_says_when_a_clock_is_ahead() -> None:
    now = time.time()
    assert ago(now - 7200) == "2 h ago"
    assert ago(now + 3600) == "in the future"
