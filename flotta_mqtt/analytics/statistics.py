"""Statistics of each selected column: count, sum, mean, variance, std, min, max, histogram
and quantiles, each an estimator (see `estimators`).

Missing values (empty CSV cells, nulls, NaN) are left out of every statistic. A worker
refuses to release any count or bin of 1 to min_group_size - 1 rows.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator

from flotta_mqtt.analytics import masking, privacy, quantiles
from flotta_mqtt.analytics.estimators import (
    Columns,
    ColumnStatistic,
    Maskable,
    MaskableColumns,
)
from flotta_mqtt.analytics.filters import check
from flotta_mqtt.analytics.plan import Agg, Request
from flotta_mqtt.analytics.registry import JobContext, register

# --- parameters ---------------------------------------------------------------------------


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
    k: int = Field(default=quantiles.DEFAULT_K, ge=16, le=quantiles.MAX_K)  # see quantiles

    @field_validator("q")
    @classmethod
    def _unit(cls, q: float | list[float]) -> float | list[float]:
        if any(not 0 <= x <= 1 for x in (q if isinstance(q, list) else [q])):
            raise ValueError("quantiles lie in [0, 1]")
        return q


# --- the statistics ---------------------------------------------------------------------


@register
class Count(Maskable):
    """Rows passing the filter; with columns, each column's values present."""

    name: ClassVar[str] = "count"
    Params = CountParams

    def empty(self, params: CountParams) -> list[int]:
        return [0] * max(1, len(params.targets()))

    def planned(self, params: CountParams, ctx: JobContext) -> list[Request]:
        check(ctx.dataset(), set(params.targets()), params.where)
        aggs = tuple(Agg("present", c) for c in params.targets()) or (Agg("rows"),)
        return [Request(params.where, (), aggs)]

    def counts(self, params: CountParams, ctx: JobContext) -> list[int]:
        (groups,) = ctx.dataset().aggregate(self.planned(params, ctx))
        return [int(n) for n in groups[()]]

    def measure(self, params: CountParams, ctx: JobContext) -> list[int]:
        counts = self.counts(params, ctx)
        for n in counts:
            ctx.dataset().release(n)
        return counts

    def noised(self, params: CountParams, ctx: JobContext, noise: privacy.Noise) -> list[int]:
        # A row changes each of the k counts by one at most.
        counts = self.counts(params, ctx)
        return noise.ints(counts, l1=len(counts), l2=math.sqrt(len(counts)))

    def merge(self, a: list[int], b: list[int]) -> list[int]:
        return [x + y for x, y in zip(a, b, strict=True)]

    def finalize(self, params: CountParams, state: list[int]) -> Any:
        return privacy.released(params.shaped(state) if params.targets() else state[0], params)

    def to_ints(self, state: list[int]) -> list[int]:
        return state

    def from_ints(self, ints: list[int]) -> list[int]:
        return ints


@register
class Sum(ColumnStatistic, Maskable):
    name: ClassVar[str] = "sum"
    Params = MaskableColumns
    clips: ClassVar[bool] = True

    def column_aggs(self, params: Any, column: str, limits: Any) -> list[Agg]:
        return [Agg("sum", column, clip=limits)]

    def from_aggs(self, params: Any, found: list[Any], n: int) -> float:
        return float(found[0])

    def start(self, params: Any) -> float:
        return 0.0

    def update(self, params: Any, state: float, numbers: np.ndarray) -> float:
        return state + float(np.sum(numbers))

    def combine(self, a: float, b: float) -> float:
        return a + b

    def noised(self, params: Any, ctx: JobContext, noise: privacy.Noise) -> list[float]:
        """Each column's sum of values clipped to its bounds, noised with its share."""
        limits = self.limits(params, ctx) or []
        sums, _ = self.states(params, ctx, limits)
        share = noise.split(len(limits))
        return [
            share.floats([total], l1=privacy.sensitivity(b), l2=privacy.sensitivity(b))[0]
            for total, b in zip(sums, limits, strict=True)
        ]

    def to_ints(self, state: list[float]) -> list[int]:
        return [masking.fixed(s) for s in state]

    def from_ints(self, ints: list[int]) -> list[float]:
        return [masking.unfixed(i) for i in ints]


@register
class Mean(ColumnStatistic, Maskable):
    name: ClassVar[str] = "mean"
    Params = MaskableColumns
    clips: ClassVar[bool] = True

    def column_aggs(self, params: Any, column: str, limits: Any) -> list[Agg]:
        return [Agg("sum", column, clip=limits)]

    def from_aggs(self, params: Any, found: list[Any], n: int) -> list[float]:
        return [float(found[0]), n]

    def start(self, params: Any) -> list[float]:
        return [0.0, 0]  # sum, count

    def update(self, params: Any, state: list[float], numbers: np.ndarray) -> list[float]:
        return [state[0] + float(np.sum(numbers)), state[1] + len(numbers)]

    def combine(self, a: list[float], b: list[float]) -> list[float]:
        return [a[0] + b[0], a[1] + b[1]]

    def result(self, params: Any, state: list[float]) -> float | None:
        return state[0] / state[1] if state[1] > 0 else None  # a noised count may be < 1

    def noised(self, params: Any, ctx: JobContext, noise: privacy.Noise) -> list[list[float]]:
        """Each column's clipped sum and its count, each noised with its share."""
        limits = self.limits(params, ctx) or []
        states, _ = self.states(params, ctx, limits)
        share = noise.split(2 * len(limits))
        noised = []
        for (total, n), b in zip(states, limits, strict=True):
            s = privacy.sensitivity(b)
            noised.append([share.floats([total], s, s)[0], share.ints([int(n)], 1, 1)[0]])
        return noised

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
    """min and max share one state: [smallest, largest] (null while no value is seen).

    They are records of the data: released only where the site's policy says so.
    """

    pick: ClassVar[int]

    def exact(self, params: Any, ctx: JobContext) -> None:
        privacy.require_extremes(ctx.dataset(), self.name)

    def column_aggs(self, params: Any, column: str, limits: Any) -> list[Agg]:
        return [Agg("min", column), Agg("max", column)]

    def from_aggs(self, params: Any, found: list[Any], n: int) -> list[float | None]:
        return [None if v is None else float(v) for v in found]

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

    def column_aggs(self, params: HistogramParams, column: str, limits: Any) -> list[Agg]:
        edges = params.edges
        bins = [
            Agg("within", column, low=low, high=high, high_closed=i == len(edges) - 2)
            for i, (low, high) in enumerate(itertools.pairwise(edges))
        ]
        below = Agg("within", column, high=edges[0])
        above = Agg("within", column, low=edges[-1], low_open=True)
        return [below, *bins, above]

    def from_aggs(self, params: HistogramParams, found: list[Any], n: int) -> list[int]:
        return [int(v) for v in found]

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

    def cells(self, params: HistogramParams, state: list[int], n: int) -> list[int]:
        return state

    def noised(self, params: HistogramParams, ctx: JobContext, noise: privacy.Noise) -> Any:
        # A row falls in one bin of each column: it changes a column's bins by one in all.
        states, _ = self.states(params, ctx)
        share = noise.split(len(states))
        return [share.ints(bins, l1=1, l2=1) for bins in states]

    def result(self, params: HistogramParams, state: list[int]) -> dict[str, Any]:
        return {"edges": params.edges, "counts": state[1:-1], "below": state[0], "above": state[-1]}


@register
class Quantile(ColumnStatistic):
    """Approximate quantiles from a mergeable sketch; error bound in quantiles.py.

    A sketch holds values of the data: released only where the site's policy says so,
    and shrunk on each worker so that it holds a small part of the worker's values.
    """

    name: ClassVar[str] = "quantile"
    Params = QuantileParams

    def exact(self, params: Any, ctx: JobContext) -> None:
        privacy.require_extremes(ctx.dataset(), self.name)

    def measure(self, params: Any, ctx: JobContext) -> list[dict[str, Any]]:
        return [quantiles.shrink(sketch) for sketch in super().measure(params, ctx)]

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
