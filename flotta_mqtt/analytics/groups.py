"""Group-by statistics: rows and means per group of the `by` columns' values.

Each is an estimator (see `estimators`) whose state maps every group to its sums, so
states merge exactly. Missing values are left out; a worker refuses to release a group of
1 to min_group_size - 1 rows, or, noised, releases only the groups whose noisy count
passes a threshold (see privacy.threshold_counts). Grouped by columns whose categories
the site declares, every combination of them is a group, empty or not: noised, each gets
a noisy count and no threshold is needed (categories.public_keys).
"""

from __future__ import annotations

import json
import math
from datetime import date
from typing import Any, ClassVar

from pydantic import Field, field_validator

from flotta_mqtt.analytics import privacy
from flotta_mqtt.analytics.categories import folded, public_keys
from flotta_mqtt.analytics.estimators import Estimator, Rows
from flotta_mqtt.analytics.filters import checked
from flotta_mqtt.analytics.plan import Agg, Request
from flotta_mqtt.analytics.registry import JobContext, register


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


def _name(key: tuple[Any, ...]) -> str:
    """A group's key in a state: its values as a JSON list."""
    return json.dumps([_json_value(v) for v in key])


def _order(key: list[Any]) -> tuple[tuple[bool, Any], ...]:
    return tuple((v is not None, v if v is not None else 0) for v in key)


def _add(a: list[float] | None, b: list[float]) -> list[float]:
    return b if a is None else [x + y for x, y in zip(a, b, strict=True)]


class GroupStatistic(Estimator):
    """Per group of the `by` columns' values, a list of sums whose first item is the rows.

    The state maps each group's values, as a JSON list, to its sums: JSON keys merge
    exactly, whatever the columns' types.
    """

    def aggs(self, params: Any, limits: tuple[float, float] | None) -> tuple[Agg, ...]:
        """The aggregates per group, in state order: the first counts the group's rows."""
        raise NotImplementedError

    def limits(self, params: Any, ctx: JobContext) -> tuple[float, float] | None:
        """The clipping bounds of a noised mean's column."""
        column = getattr(params, "column", None)
        if column is None or privacy.requested(params) is None:
            return None
        return privacy.bounds(params, ctx.dataset(), column)

    def planned(self, params: Any, ctx: JobContext) -> list[Request]:
        column = getattr(params, "column", None)
        numbers = [column] if column is not None else []
        checked(ctx.dataset(), [*params.by, *numbers], params.where, numbers=numbers)
        return [
            Request(params.where, tuple(params.by), self.aggs(params, self.limits(params, ctx)))
        ]

    def row(self, params: Any, state: list[float]) -> dict[str, Any]:
        raise NotImplementedError

    def empty(self, params: GroupParams) -> dict[str, list[float]]:
        return {}

    def states(self, params: Any, ctx: JobContext) -> dict[str, list[float]]:
        """Each group's sums (the column's values clipped to its bounds when noised), and
        zeros for the declared groups the data lacks. Keys are the declared values (or
        None) whatever the source returned (categories.folded)."""
        data = ctx.dataset()
        (groups,) = data.aggregate(self.planned(params, ctx))
        public = folded(params.by, data.categories, groups)
        states = {_name(key): [float(v) for v in found] for key, found in public.items()}
        empty = [0.0] * len(self.aggs(params, None))
        for key in public_keys(params.by, data.categories) or ():
            states.setdefault(_name(key), empty)
        return states

    def measure(self, params: Any, ctx: JobContext) -> dict[str, list[float]]:
        states = self.states(params, ctx)
        for state in states.values():
            ctx.dataset().release(int(state[0]))
        return states

    def counted(
        self, params: Any, states: dict[str, list[float]], ctx: JobContext, noise: privacy.Noise
    ) -> dict[str, int]:
        """The groups' noised counts: every declared group's, else only those whose noisy
        count passes the threshold (no refusal, so nothing to search; a group of one row
        shows with probability delta)."""
        data = ctx.dataset()
        counts = {name: int(state[0]) for name, state in states.items()}
        if public_keys(params.by, data.categories) is not None:
            return privacy.public_counts(counts, noise.epsilon)
        return privacy.threshold_counts(counts, noise, data.min_group_size)

    def merge(self, a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, list[float]]:
        merged = dict(a)
        for name, state in b.items():
            merged[name] = _add(merged.get(name), state)
        return merged

    def finalize(self, params: Any, state: dict[str, list[float]]) -> Any:
        groups = [(json.loads(name), sums) for name, sums in state.items()]
        rows = [
            {**dict(zip(params.by, key, strict=True)), **self.row(params, sums)}
            for key, sums in sorted(groups, key=lambda group: _order(group[0]))
        ]
        # Counts are Laplace-noised; with delta, groups not declared pass a threshold.
        mechanism = "laplace_threshold" if params.delta > 0 else "laplace"
        return privacy.released(rows, params, mechanism)


@register
class GroupCount(GroupStatistic):
    """Rows per group: a list of {by columns..., "count"}, sorted by group."""

    name: ClassVar[str] = "group_count"
    Params = GroupParams

    def aggs(self, params: GroupParams, limits: tuple[float, float] | None) -> tuple[Agg, ...]:
        return (Agg("rows"),)

    def row(self, params: GroupParams, state: list[float]) -> dict[str, Any]:
        return {"count": int(state[0])}

    def noised(
        self, params: GroupParams, ctx: JobContext, noise: privacy.Noise
    ) -> dict[str, list[float]]:
        counts = self.counted(params, self.states(params, ctx), ctx, noise)
        return {name: [n] for name, n in counts.items()}


@register
class GroupMean(GroupStatistic):
    """Mean of `column` per group: a list of {by columns..., "count", "mean"}."""

    name: ClassVar[str] = "group_mean"
    Params = GroupMeanParams

    def aggs(self, params: GroupMeanParams, limits: tuple[float, float] | None) -> tuple[Agg, ...]:
        return (Agg("present", params.column), Agg("sum", params.column, clip=limits))

    def row(self, params: GroupMeanParams, state: list[float]) -> dict[str, Any]:
        return {"count": int(state[0]), "mean": state[1] / state[0] if state[0] > 0 else None}

    def noised(
        self, params: GroupMeanParams, ctx: JobContext, noise: privacy.Noise
    ) -> dict[str, list[float]]:
        """Half the epsilon for the groups' noised counts (and all of delta, spent only
        where groups are thresholded: see `counted`), half for Laplace noise on the released
        groups' clipped sums: a row is in one group's sum."""
        limits = privacy.bounds(params, ctx.dataset(), params.column)
        states = self.states(params, ctx)
        counts = self.counted(params, states, ctx, privacy.Noise(noise.epsilon / 2, noise.delta))
        names = sorted(counts)
        s = privacy.sensitivity(limits)
        sums = privacy.Noise(noise.epsilon / 2, 0.0).floats([states[n][1] for n in names], s, s)
        return {name: [counts[name], total] for name, total in zip(names, sums, strict=True)}
