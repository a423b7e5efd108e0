"""The cron parser, against an oracle written the plain way: each field expanded by hand,
and the next run found by trying every minute."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flotta_mqtt.model.cron import Cron

BOUNDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
START = datetime(2020, 1, 1, tzinfo=UTC).timestamp()
END = datetime(2040, 1, 1, tzinfo=UTC).timestamp()


@st.composite
def element(draw: st.DrawFn, low: int, high: int) -> tuple[str, set[int]]:
    """One list element of a field, and the values it stands for."""
    kind = draw(st.sampled_from(["star", "n", "range", "star-step", "range-step", "from-step"]))
    a = draw(st.integers(low, high))
    b = draw(st.integers(a, high))
    step = draw(st.integers(1, high - low + 1))
    return {
        "star": ("*", set(range(low, high + 1))),
        "n": (str(a), {a}),
        "range": (f"{a}-{b}", set(range(a, b + 1))),
        "star-step": (f"*/{step}", set(range(low, high + 1, step))),
        "range-step": (f"{a}-{b}/{step}", set(range(a, b + 1, step))),
        "from-step": (f"{a}/{step}", set(range(a, high + 1, step))),
    }[kind]


@st.composite
def expression(draw: st.DrawFn) -> tuple[str, list[set[int]]]:
    fields, values = [], []
    for low, high in BOUNDS:
        parts = draw(st.lists(element(low, high), min_size=1, max_size=3))
        fields.append(",".join(text for text, _ in parts))
        values.append(set().union(*(v for _, v in parts)))
    return " ".join(fields), values


def fires(text: str, values: list[set[int]], moment: datetime) -> bool:
    """The oracle: Vixie cron's rule, day fields OR-ed when both are restricted."""
    minutes, hours, days, months, weekdays = values
    weekday = (moment.weekday() + 1) % 7
    in_week = weekday in weekdays or (weekday == 0 and 7 in weekdays)
    in_month = moment.day in days
    restricted = [not field.startswith("*") for field in text.split()]
    day = in_month or in_week if restricted[2] and restricted[4] else in_month and in_week
    return moment.minute in minutes and moment.hour in hours and moment.month in months and day


@settings(max_examples=300, deadline=None)
@given(expression(), st.floats(START, END))
def test_the_next_run_is_the_first_minute_that_matches(
    case: tuple[str, list[set[int]]], moment: float
) -> None:
    text, values = case
    try:
        cron = Cron.parse(text)
    except ValueError as exc:  # only an impossible day: 31 February and the like
        assert "never fires" in str(exc)
        return
    assert Cron.parse(cron.text) == cron
    assert (cron.minutes, cron.hours, cron.days, cron.months) == tuple(values[:4])
    found = cron.next_after(moment)
    when = datetime.fromtimestamp(found, UTC)
    assert found > moment and when.second == 0 and when.microsecond == 0
    assert fires(text, values, when)
    # No minute before it matches (looked at minute by minute over the first two days).
    minute = datetime.fromtimestamp(moment, UTC).replace(second=0, microsecond=0)
    for _ in range(2 * 24 * 60):
        minute += timedelta(minutes=1)
        if minute >= when:
            break
        assert not fires(text, values, minute), f"{text} fires at {minute} before {when}"


@given(st.text(max_size=40))
def test_any_text_is_parsed_or_refused_with_a_value_error(text: str) -> None:
    try:
        Cron.parse(text)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("* * * *", "has 4 fields, not 5 (minute hour day-of-month month day-of-week)"),
        ("60 * * * *", "cron minute field '60': 60 is out of range 0-59"),
        ("* 1-30 * * *", "cron hour field '1-30': 30 is out of range 0-23"),
        ("* * * * 8", "cron day-of-week field '8': 8 is out of range 0-7"),
        ("*/0 * * * *", "cron minute field '*/0': step 0 is out of range"),
        ("5-1 * * * *", "cron minute field '5-1': '5-1' runs backwards"),
        ("* * * foo *", "cron month field 'foo': 'foo' is not a number from 1 to 12"),
        ("0 0 30 feb *", "cron expression '0 0 30 feb *' never fires"),
        ("* " * 200, "a cron expression is at most 256 characters"),
    ],
)
def test_each_mistake_is_named(text: str, error: str) -> None:
    with pytest.raises(ValueError) as refused:
        Cron.parse(text)
    assert error in str(refused.value)


def test_names_sundays_and_leap_days() -> None:
    thursday_noon = datetime(2026, 12, 3, 12, 0, 30, tzinfo=UTC).timestamp()

    def next_run(text: str) -> datetime:
        return datetime.fromtimestamp(Cron.parse(text).next_after(thursday_noon), UTC)

    assert next_run("0 9 * * mon-fri") == datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
    assert (
        next_run("5 4 * * 7") == next_run("5 4 * * SUN") == datetime(2026, 12, 6, 4, 5, tzinfo=UTC)
    )
    assert next_run("30 2 29 feb *") == datetime(2028, 2, 29, 2, 30, tzinfo=UTC)
    assert next_run("0 0 1,15 * 5") == datetime(2026, 12, 4, tzinfo=UTC)  # either day field
    assert next_run("* * * * *") == datetime(2026, 12, 3, 12, 1, tzinfo=UTC)


def test_a_day_that_comes_once_a_decade_is_found() -> None:
    """`*/7` in the day-of-week field starts with `*`, so both day fields must match: 1
    January that is a Sunday, which after 2023 comes again in 2034 (hypothesis found a
    search horizon of 8 years too short)."""
    cron = Cron.parse("* * 1 1 */7")
    after = datetime(2023, 1, 2, tzinfo=UTC).timestamp()
    assert datetime.fromtimestamp(cron.next_after(after), UTC) == datetime(2034, 1, 1, tzinfo=UTC)
