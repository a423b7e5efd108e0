"""Cron expressions of five fields (minute hour day-of-month month day-of-week), in UTC.

Each field is `*` or a comma-separated list of `N`, `A-B`, `*/S`, `A-B/S` or `A/S` (from A
to the field's end, every S); months may be named `jan`-`dec` and days `sun`-`sat`, and
day-of-week 7 is Sunday as 0 is. As in Vixie cron, when both day fields are restricted
(neither starts with `*`) a day matching either one matches. Small enough to own: the
Python cron libraries in use are either unmaintained (croniter announced its end in
2024) or larger than the scheduler's need (time zones, seconds, @-macros).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import MAXYEAR, UTC, datetime, timedelta

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (  # name, lowest, highest, names
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, {name: number for number, name in enumerate(_MONTHS, 1)}),
    ("day-of-week", 0, 7, {name: number for number, name in enumerate(_WEEKDAYS)}),
)
_ELEMENT = re.compile(r"^(?:(\*)|([0-9a-z]+)(?:-([0-9a-z]+))?)(?:/([0-9]+))?$")
MAX_LENGTH = 256
# How far ahead a next run is looked for: the Gregorian calendar repeats every 400 years,
# so a day that matches at all (29 February that is a Sunday, say) matches within them.
_HORIZON_YEARS = 400


@dataclass(frozen=True)
class Cron:
    """A parsed expression: the values each field matches; `Cron.parse` makes one."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_or_weekdays: bool  # both day fields restricted: either matches

    @classmethod
    def parse(cls, text: str) -> Cron:
        """The expression `text`, or ValueError naming the field and what is wrong."""
        if len(text) > MAX_LENGTH:
            raise ValueError(f"a cron expression is at most {MAX_LENGTH} characters")
        fields = text.split()
        if len(fields) != 5:
            raise ValueError(
                f"cron expression {text!r} has {len(fields)} fields, not 5 "
                "(minute hour day-of-month month day-of-week)"
            )
        minutes, hours, days, months, weekdays = (
            _field(field, *spec) for field, spec in zip(fields, _FIELDS, strict=True)
        )
        cron = cls(
            text=" ".join(fields),
            minutes=minutes,
            hours=hours,
            days=days,
            months=months,
            weekdays=frozenset(day % 7 for day in weekdays),
            days_or_weekdays=not fields[2].startswith("*") and not fields[4].startswith("*"),
        )
        if cron._next_day(datetime(2000, 1, 1, tzinfo=UTC)) is None:
            raise ValueError(f"cron expression {text!r} never fires: no date has that day")
        return cron

    def next_after(self, moment: float) -> float:
        """The first time it fires strictly after `moment` (seconds since the epoch, UTC)."""
        start = datetime.fromtimestamp(moment, UTC).replace(second=0, microsecond=0)
        start += timedelta(minutes=1)
        day = start.replace(hour=0, minute=0)
        while True:
            found = self._next_day(day)
            assert found is not None  # parse() refused expressions that never fire
            first = start if found == day else found
            for hour in sorted(h for h in self.hours if h >= first.hour):
                low = first.minute if hour == first.hour else 0
                minute = min((m for m in self.minutes if m >= low), default=None)
                if minute is not None:
                    return found.replace(hour=hour, minute=minute).timestamp()
            day = found + timedelta(days=1)
            start = day

    def _day_matches(self, day: datetime) -> bool:
        if day.month not in self.months:
            return False
        in_month = day.day in self.days
        in_week = (day.weekday() + 1) % 7 in self.weekdays
        return in_month or in_week if self.days_or_weekdays else in_month and in_week

    def _next_day(self, day: datetime) -> datetime | None:
        """The first day from `day` (its midnight) on which it fires, within the horizon;
        the months it never fires in are skipped whole."""
        end = datetime(min(day.year + _HORIZON_YEARS, MAXYEAR), 1, 1, tzinfo=UTC)
        while day < end:
            if day.month not in self.months:
                day = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
            elif self._day_matches(day):
                return day
            else:
                day += timedelta(days=1)
        return None


def _field(text: str, name: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    """The values one field matches, or ValueError naming the field and the element."""
    values: set[int] = set()
    for element in text.split(","):
        match = _ELEMENT.fullmatch(element.lower())
        if match is None:
            raise ValueError(f"cron {name} field {text!r}: {element!r} is not N, A-B or */S")
        star, first, last, step = match.groups()
        try:
            if star:
                start, end = low, high
            else:
                start = _number(first, low, high, names)
                end = _number(last, low, high, names) if last else start
                if step and not last:
                    end = high  # `A/S`: from A on
        except ValueError as exc:
            raise ValueError(f"cron {name} field {text!r}: {exc}") from None
        if start > end:
            raise ValueError(f"cron {name} field {text!r}: {element!r} runs backwards")
        stride = int(step) if step else 1
        if not 1 <= stride <= high - low + 1:
            raise ValueError(f"cron {name} field {text!r}: step {step} is out of range")
        values.update(range(start, end + 1, stride))
    return frozenset(values)


def _number(text: str, low: int, high: int, names: dict[str, int]) -> int:
    """A field's value, by number or by name."""
    if text in names:
        return names[text]
    if not text.isdigit() or len(text) > 2:
        raise ValueError(f"{text!r} is not a number from {low} to {high}")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{value} is out of range {low}-{high}")
    return value
