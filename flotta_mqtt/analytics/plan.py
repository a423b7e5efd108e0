"""A job's aggregates as data, answered by one scan of a source.

An estimator asks for `Request`s (a filter, grouping columns and aggregates); a source
answers all the requests of a job at once: one statement groups the rows by the union of
the requests' grouping columns, each aggregate under its request's filter, and each
request's groups are rolled up from that (sources.py compiles it, `answer` rolls up).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flotta_mqtt.model.query import Filter

Kind = Literal["rows", "present", "sum", "min", "max", "within"]
Key = tuple[Any, ...]
Groups = dict[Key, list[Any]]  # each group's values (the grouping columns' values) → aggregates


@dataclass(frozen=True)
class Agg:
    """One aggregate of a column's present values (missing and NaN left out).

    rows: the rows passing; present: the column's present values; sum (of values clipped
    to `clip`), min, max; within: the values in [low, high) (low and high may be None:
    unbounded; `low_open` excludes low, `high_closed` includes high).
    """

    kind: Kind
    column: str | None = None
    clip: tuple[float, float] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_closed: bool = False

    def empty(self) -> Any:
        """The aggregate of no rows."""
        return None if self.kind in ("min", "max") else 0

    def combine(self, a: Any, b: Any) -> Any:
        if a is None or b is None:
            return b if a is None else a
        if self.kind == "min":
            return min(a, b)
        if self.kind == "max":
            return max(a, b)
        return a + b


@dataclass(frozen=True)
class Request:
    """Aggregates of the rows passing `where`, per group of the `by` columns' values (one
    group, keyed (), when `by` is empty). A grouped request keeps the groups whose first
    aggregate is not 0, so lead with the rows (or present values) that make a group."""

    where: Filter | None = field(compare=False)  # compared (and hashed) as its JSON
    by: tuple[str, ...]
    aggs: tuple[Agg, ...]
    where_json: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "where_json", self.where.model_dump_json() if self.where is not None else ""
        )

    def columns(self) -> set[str]:
        used = {a.column for a in self.aggs if a.column is not None}
        return used | set(self.by) | (self.where.columns() if self.where is not None else set())


@dataclass(frozen=True)
class Select:
    """What one scan computes: grouped by `by`, each aggregate with its request's filter."""

    by: tuple[str, ...]
    aggs: tuple[tuple[Filter | None, Agg], ...]


def joined(requests: Sequence[Request]) -> tuple[Select, list[list[int]]]:
    """The scan answering every request, and where each request's aggregates are in it."""
    by = tuple(dict.fromkeys(b for r in requests for b in r.by))
    index: dict[tuple[str, Agg], int] = {}
    filters: list[tuple[Filter | None, Agg]] = []
    places = []
    for request in requests:
        place = []
        for agg in request.aggs:
            key = (request.where_json, agg)
            if key not in index:
                index[key] = len(filters)
                filters.append((request.where, agg))
            place.append(index[key])
        places.append(place)
    return Select(by, tuple(filters)), places


def answer(
    requests: Sequence[Request], scan: Callable[[Select], list[tuple[Any, ...]]]
) -> list[Groups]:
    """Each request's groups, from one `scan` (its rows: the `by` values, then the aggregates)."""
    select, places = joined(requests)
    rows = scan(select)
    width = len(select.by)
    answers = []
    for request, place in zip(requests, places, strict=True):
        positions = [select.by.index(b) for b in request.by]
        groups: Groups = {} if request.by else {(): [a.empty() for a in request.aggs]}
        for row in rows:
            key = tuple(row[i] for i in positions)
            found = [row[width + i] for i in place]
            old = groups.get(key)
            groups[key] = (
                found
                if old is None
                else [a.combine(x, y) for a, x, y in zip(request.aggs, old, found, strict=True)]
            )
        if request.by:
            groups = {k: v for k, v in groups.items() if v[0]}
        answers.append(
            {
                k: [a.empty() if x is None else x for a, x in zip(request.aggs, v, strict=True)]
                for k, v in groups.items()
            }
        )
    return answers
