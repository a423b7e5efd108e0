"""Estimators: statistics split into a local part on every worker and an exact merge.

Each worker measures the rows its query selects into a small JSON state and merges it
with the states it consumes; the initiator starts from the empty state and finalises the
merged one. The same operation therefore serves Parallel → Collect → Finalize and
Sequential alike; count, sum and mean can also run masked in a Sequential (masking.py).

Missing values (empty CSV cells, nulls, NaN) are left out of every statistic. A worker
refuses to release any count, group or bin of 1 to min_group_size - 1 rows.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from datetime import date
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flotta_mqtt.analytics import masking, quantiles
from flotta_mqtt.analytics.filters import present, select, values
from flotta_mqtt.analytics.registry import (
    JobContext,
    OperationDef,
    register,
)
from flotta_mqtt.model.query import Filter

# --- the split every estimator follows --------------------------------------------------


class Estimator(OperationDef):
    """A statistic as four pure parts: empty, measure (local data), merge and finalize."""

    def empty(self, params: Any) -> Any:
        raise NotImplementedError

    def measure(self, params: Any, ctx: JobContext) -> Any:
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def finalize(self, params: Any, state: Any) -> Any:
        return state

    def initialize(self, params: Any, ctx: JobContext) -> Any:
        return self.empty(params)

    def local(self, params: Any, ctx: JobContext) -> Any:
        return functools.reduce(self.merge, ctx.inputs, self.measure(params, ctx))

    def aggregate(self, params: Any, ctx: JobContext) -> Any:
        return self.finalize(params, functools.reduce(self.merge, ctx.inputs, self.empty(params)))


class Maskable(Estimator):
    """An estimator whose state is a list of numbers, so it can run masked (`masked: true`)."""

    def to_ints(self, state: Any) -> list[int]:
        raise NotImplementedError

    def from_ints(self, ints: list[int]) -> Any:
        raise NotImplementedError

    def _size(self, params: Any) -> int:
        return len(self.to_ints(self.empty(params)))

    def initialize(self, params: Any, ctx: JobContext) -> Any:
        if not params.masked:
            return super().initialize(params, ctx)
        return masking.start(ctx.job, self._size(params))

    def local(self, params: Any, ctx: JobContext) -> Any:
        if not params.masked:
            return super().local(params, ctx)
        running = ctx.inputs[0] if len(ctx.inputs) == 1 else None
        return masking.add(running, self.to_ints(self.measure(params, ctx)), ctx.node)

    def aggregate(self, params: Any, ctx: JobContext) -> Any:
        if not params.masked:
            return super().aggregate(params, ctx)
        running = ctx.inputs[0] if len(ctx.inputs) == 1 else None
        ints = masking.remove(running, ctx.job, self._size(params), ctx.node)
        return self.finalize(params, self.from_ints(ints))


# --- parameters -------------------------------------------------------------------------


class Rows(BaseModel):
    """Which rows: a filter from a Query (`Query.params()` fills `where` and `columns`)."""

    model_config = ConfigDict(extra="forbid")

    where: Filter | None = None


class Columns(Rows):
    """`column` gives one result; `columns` (a Query's selection) a result per column."""

    needs_column: ClassVar[bool] = True

    column: str | None = Field(default=None, min_length=1)
    columns: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> Columns:
        if self.column is not None and self.columns is not None:
            raise ValueError("give column or columns, not both")
        if self.needs_column and self.column is None and self.columns is None:
            raise ValueError("give column (one result) or columns (a result per column)")
        return self

    def targets(self) -> list[str]:
        return [self.column] if self.column is not None else list(self.columns or [])

    def result(self, per_column: list[Any]) -> Any:
        if self.column is not None:
            return per_column[0]
        return dict(zip(self.targets(), per_column, strict=True))


class MaskableColumns(Columns):
    masked: bool = False  # run masked in a Sequential step (masking.py)


class CountParams(MaskableColumns):
    needs_column: ClassVar[bool] = False  # without columns: the rows passing the filter


class VarianceParams(Columns):
    ddof: int = Field(default=1, ge=0)  # 1: the sample variance, as pandas; 0: population


class HistogramParams(Columns):
    edges: list[float] = Field(min_length=2)  # bins [e0, e1), [e1, e2), …, [e(n-1), en]

    @field_validator("edges")
    @classmethod
    def _increasing(cls, edges: list[float]) -> list[float]:
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError("edges must increase strictly")
        return edges


class QuantileParams(Columns):
    q: float | list[float]  # one quantile (one value) or several (a list), each in [0, 1]
    k: int = Field(default=quantiles.DEFAULT_K, ge=16, le=1 << 16)  # accuracy: see quantiles

    @field_validator("q")
    @classmethod
    def _unit(cls, q: float | list[float]) -> float | list[float]:
        if any(not 0 <= x <= 1 for x in (q if isinstance(q, list) else [q])):
            raise ValueError("quantiles lie in [0, 1]")
        return q


# --- per-column statistics ----------------------------------------------------------------


class ColumnStatistic(Estimator):
    """A statistic of each selected numeric column; the state is a list, one per column."""

    Params: ClassVar[type[BaseModel]] = Columns

    def start(self, params: Any) -> Any:
        raise NotImplementedError

    def update(self, params: Any, state: Any, numbers: np.ndarray) -> Any:
        raise NotImplementedError

    def combine(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def result(self, params: Any, state: Any) -> Any:
        return state

    def cells(self, params: Any, column: str, state: Any, n: int) -> list[tuple[int, str]]:
        """The row counts this state discloses, each with what it counts."""
        return [(n, f"column {column}")]

    def empty(self, params: Columns) -> list[Any]:
        return [self.start(params) for _ in params.targets()]

    def measure(self, params: Columns, ctx: JobContext) -> list[Any]:
        data = ctx.dataset()
        targets = params.targets()
        states = self.empty(params)
        counts = [0] * len(targets)
        for batch in select(data, targets, params.where, numbers=targets):
            for i, column in enumerate(targets):
                numbers = values(batch, column)
                counts[i] += len(numbers)
                states[i] = self.update(params, states[i], numbers)
        for column, state, n in zip(targets, states, counts, strict=True):
            for rows, what in self.cells(params, column, state, n):
                data.release(rows, what)
        return states

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return [self.combine(x, y) for x, y in zip(a, b, strict=True)]

    def finalize(self, params: Columns, state: list[Any]) -> Any:
        return params.result([self.result(params, s) for s in state])


@register
class Count(Maskable):
    """Rows passing the filter; with columns, each column's values present."""

    name: ClassVar[str] = "count"
    Params = CountParams

    def empty(self, params: CountParams) -> list[int]:
        return [0] * max(1, len(params.targets()))

    def measure(self, params: CountParams, ctx: JobContext) -> list[int]:
        data = ctx.dataset()
        targets = params.targets()
        if not targets and params.where is None:
            counts = [data.count_rows()]
        else:
            counts = self.empty(params)
            for batch in select(data, targets, params.where):
                for i, column in enumerate(targets):
                    counts[i] += pc.sum(present(batch.column(column))).as_py() or 0
                if not targets:
                    counts[0] += batch.num_rows
        for n, column in zip(counts, targets or ["rows passing the filter"], strict=True):
            data.release(n, f"column {column}" if targets else column)
        return counts

    def merge(self, a: list[int], b: list[int]) -> list[int]:
        return [x + y for x, y in zip(a, b, strict=True)]

    def finalize(self, params: CountParams, state: list[int]) -> Any:
        return params.result(state) if params.targets() else state[0]

    def to_ints(self, state: list[int]) -> list[int]:
        return state

    def from_ints(self, ints: list[int]) -> list[int]:
        return ints


@register
class Sum(ColumnStatistic, Maskable):
    name: ClassVar[str] = "sum"
    Params = MaskableColumns

    def start(self, params: Any) -> float:
        return 0.0

    def update(self, params: Any, state: float, numbers: np.ndarray) -> float:
        return state + float(np.sum(numbers))

    def combine(self, a: float, b: float) -> float:
        return a + b

    def to_ints(self, state: list[float]) -> list[int]:
        return [masking.fixed(s) for s in state]

    def from_ints(self, ints: list[int]) -> list[float]:
        return [masking.unfixed(i) for i in ints]


@register
class Mean(ColumnStatistic, Maskable):
    name: ClassVar[str] = "mean"
    Params = MaskableColumns

    def start(self, params: Any) -> list[float]:
        return [0.0, 0]  # sum, count

    def update(self, params: Any, state: list[float], numbers: np.ndarray) -> list[float]:
        return [state[0] + float(np.sum(numbers)), state[1] + len(numbers)]

    def combine(self, a: list[float], b: list[float]) -> list[float]:
        return [a[0] + b[0], a[1] + b[1]]

    def result(self, params: Any, state: list[float]) -> float | None:
        return state[0] / state[1] if state[1] else None

    def to_ints(self, state: list[list[float]]) -> list[int]:
        return [v for total, n in state for v in (masking.fixed(total), int(n))]

    def from_ints(self, ints: list[int]) -> list[list[float]]:
        return [[masking.unfixed(ints[i]), ints[i + 1]] for i in range(0, len(ints), 2)]


def chan(a: list[float], b: list[float]) -> list[float]:
    """Merge two (n, mean, M2) summaries exactly (Chan, Golub & LeVeque)."""
    n = a[0] + b[0]
    if not n:
        return [0, 0.0, 0.0]
    delta = b[1] - a[1]
    mean = a[1] + delta * b[0] / n
    return [n, mean, a[2] + b[2] + delta * delta * a[0] * b[0] / n]


def moments(numbers: np.ndarray) -> list[float]:
    """(n, mean, M2) of some numbers, M2 being the sum of squared deviations.

    The corrected two-pass algorithm: the mean is refined by its residuals' mean, so equal
    numbers give a variance of exactly 0.
    """
    if not len(numbers):
        return [0, 0.0, 0.0]
    mean = float(np.mean(numbers))
    deviations = numbers - mean
    shift = float(np.mean(deviations))
    m2 = float(np.sum(np.square(deviations))) - len(numbers) * shift * shift
    return [len(numbers), mean + shift, max(m2, 0.0)]


@register
class Variance(ColumnStatistic):
    name: ClassVar[str] = "variance"
    Params = VarianceParams

    def start(self, params: Any) -> list[float]:
        return [0, 0.0, 0.0]

    def update(self, params: Any, state: list[float], numbers: np.ndarray) -> list[float]:
        return chan(state, moments(numbers))

    def combine(self, a: list[float], b: list[float]) -> list[float]:
        return chan(a, b)

    def result(self, params: VarianceParams, state: list[float]) -> float | None:
        n, _, m2 = state
        return m2 / (n - params.ddof) if n > params.ddof else None


@register
class Std(Variance):
    name: ClassVar[str] = "std"

    def result(self, params: VarianceParams, state: list[float]) -> float | None:
        variance = super().result(params, state)
        return None if variance is None else math.sqrt(variance)


class Extremes(ColumnStatistic):
    """min and max share one state: [smallest, largest] (null while no value is seen)."""

    pick: ClassVar[int]

    def start(self, params: Any) -> list[float | None]:
        return [None, None]

    def update(
        self, params: Any, state: list[float | None], numbers: np.ndarray
    ) -> list[float | None]:
        if not len(numbers):
            return state
        return self.combine(state, [float(np.min(numbers)), float(np.max(numbers))])

    def combine(self, a: list[float | None], b: list[float | None]) -> list[float | None]:
        lows = [x for x in (a[0], b[0]) if x is not None]
        highs = [x for x in (a[1], b[1]) if x is not None]
        return [min(lows) if lows else None, max(highs) if highs else None]

    def result(self, params: Any, state: list[float | None]) -> float | None:
        return state[self.pick]


@register
class Min(Extremes):
    name: ClassVar[str] = "min"
    pick: ClassVar[int] = 0


@register
class Max(Extremes):
    name: ClassVar[str] = "max"
    pick: ClassVar[int] = 1


@register
class Histogram(ColumnStatistic):
    """Counts per bin of the given edges (as numpy.histogram), plus below and above them."""

    name: ClassVar[str] = "histogram"
    Params = HistogramParams

    def start(self, params: HistogramParams) -> list[int]:
        return [0] * (len(params.edges) + 1)  # below, one per bin, above

    def update(self, params: HistogramParams, state: list[int], numbers: np.ndarray) -> list[int]:
        # Bin i holds edges[i] <= x < edges[i + 1]; the last bin also holds its right edge.
        edges = np.asarray(params.edges)
        index = np.searchsorted(edges, numbers, side="right")
        index[numbers == edges[-1]] = len(edges) - 1
        counts = np.bincount(index, minlength=len(edges) + 1)
        return [a + int(b) for a, b in zip(state, counts, strict=True)]

    def combine(self, a: list[int], b: list[int]) -> list[int]:
        return [x + y for x, y in zip(a, b, strict=True)]

    def cells(
        self, params: HistogramParams, column: str, state: list[int], n: int
    ) -> list[tuple[int, str]]:
        e = params.edges
        bins = [f"[{a}, {b})" for a, b in itertools.pairwise(e)]
        bins[-1] = bins[-1][:-1] + "]"  # the last bin holds its right edge
        names = [f"below {e[0]}", *bins, f"above {e[-1]}"]
        return [
            (rows, f"column {column} bin {name}") for rows, name in zip(state, names, strict=True)
        ]

    def result(self, params: HistogramParams, state: list[int]) -> dict[str, Any]:
        return {"edges": params.edges, "counts": state[1:-1], "below": state[0], "above": state[-1]}


@register
class Quantile(ColumnStatistic):
    """Approximate quantiles from a mergeable sketch; error bound in quantiles.py."""

    name: ClassVar[str] = "quantile"
    Params = QuantileParams

    def start(self, params: QuantileParams) -> dict[str, Any]:
        return quantiles.empty(params.k)

    def update(
        self, params: QuantileParams, state: dict[str, Any], numbers: np.ndarray
    ) -> dict[str, Any]:
        return quantiles.update(state, numbers)

    def combine(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return quantiles.merge(a, b)

    def result(self, params: QuantileParams, state: dict[str, Any]) -> Any:
        qs = params.q if isinstance(params.q, list) else [params.q]
        found = quantiles.quantiles(state, qs)
        return found if isinstance(params.q, list) else found[0]


# --- group-by -------------------------------------------------------------------------------


class GroupParams(Rows):
    by: list[str] = Field(min_length=1)  # the grouping columns (one name is taken as [name])

    @field_validator("by", mode="before")
    @classmethod
    def _listed(cls, by: Any) -> Any:
        return [by] if isinstance(by, str) else by


class GroupMeanParams(GroupParams):
    column: str = Field(min_length=1)


def _json_value(value: Any) -> Any:
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _order(key: list[Any]) -> tuple[tuple[bool, Any], ...]:
    return tuple((v is not None, v if v is not None else 0) for v in key)


def _add(a: list[float] | None, b: list[float]) -> list[float]:
    return b if a is None else [x + y for x, y in zip(a, b, strict=True)]


class GroupStatistic(Estimator):
    """Per group of the `by` columns' values, a list of sums whose first item is the rows.

    The state maps each group's values, as a JSON list, to its sums: JSON keys merge
    exactly, whatever the columns' types.
    """

    def aggregates(self, params: Any) -> list[tuple[Any, ...]]:
        """pyarrow hash aggregations giving a batch's sums per group, in state order."""
        raise NotImplementedError

    def row(self, params: Any, state: list[float]) -> dict[str, Any]:
        raise NotImplementedError

    def empty(self, params: GroupParams) -> dict[str, list[float]]:
        return {}

    def measure(self, params: Any, ctx: JobContext) -> dict[str, list[float]]:
        data = ctx.dataset()
        column = getattr(params, "column", None)
        numbers = [column] if column is not None else []
        states: dict[str, list[float]] = {}
        for batch in select(data, [*params.by, *numbers], params.where, numbers=numbers):
            if column is not None:
                batch = batch.filter(present(batch.column(column)))
            grouped = pa.Table.from_batches([batch]).group_by(params.by)
            table = grouped.aggregate(self.aggregates(params))
            sums = table.select(table.column_names[-len(self.aggregates(params)) :])
            keys = table.select(params.by).to_pylist()
            for key, row in zip(keys, sums.to_pylist(), strict=True):
                name = json.dumps([_json_value(key[b]) for b in params.by])
                states[name] = _add(states.get(name), list(row.values()))
        for name, state in states.items():
            group = ", ".join(f"{b}={v}" for b, v in zip(params.by, json.loads(name), strict=True))
            data.release(int(state[0]), f"group {group}")
        return states

    def merge(self, a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, list[float]]:
        merged = dict(a)
        for name, state in b.items():
            merged[name] = _add(merged.get(name), state)
        return merged

    def finalize(self, params: Any, state: dict[str, list[float]]) -> list[dict[str, Any]]:
        groups = [(json.loads(name), sums) for name, sums in state.items()]
        return [
            {**dict(zip(params.by, key, strict=True)), **self.row(params, sums)}
            for key, sums in sorted(groups, key=lambda group: _order(group[0]))
        ]


@register
class GroupCount(GroupStatistic):
    """Rows per group: a list of {by columns..., "count"}, sorted by group."""

    name: ClassVar[str] = "group_count"
    Params = GroupParams

    def aggregates(self, params: GroupParams) -> list[tuple[Any, ...]]:
        return [([], "count_all")]

    def row(self, params: GroupParams, state: list[float]) -> dict[str, Any]:
        return {"count": int(state[0])}


@register
class GroupMean(GroupStatistic):
    """Mean of `column` per group: a list of {by columns..., "count", "mean"}."""

    name: ClassVar[str] = "group_mean"
    Params = GroupMeanParams

    def aggregates(self, params: GroupMeanParams) -> list[tuple[Any, ...]]:
        return [(params.column, "count"), (params.column, "sum")]

    def row(self, params: GroupMeanParams, state: list[float]) -> dict[str, Any]:
        return {"count": int(state[0]), "mean": state[1] / state[0]}
