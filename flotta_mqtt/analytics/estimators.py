"""Estimators: statistics split into a local part on every worker and an exact merge.

Each worker measures the rows its query selects into a small JSON state and merges it
with the states it consumes; the initiator starts from the empty state and finalises the
merged one. The same operation therefore serves Parallel → Collect → Finalize and
Sequential alike; a maskable estimator can also run masked in a Sequential (masking.py).
The statistics themselves are in `statistics` (per column) and `groups` (group-by).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flotta_mqtt.analytics import masking, privacy
from flotta_mqtt.analytics.filters import checked, select, values
from flotta_mqtt.analytics.plan import Agg, Groups, Request
from flotta_mqtt.analytics.registry import JobContext, OperationDef, PrivacyRefused
from flotta_mqtt.model import JobRole
from flotta_mqtt.model.query import Filter

# --- the split every estimator follows --------------------------------------------------


class Estimator(OperationDef):
    """A statistic as four pure parts: empty, measure (local data), merge and finalize.

    What leaves a worker is `own`: the exact measure where the site's policy allows it,
    or, when the params give an epsilon, `noised`, paid for from the site's budget.
    """

    def empty(self, params: Any) -> Any:
        raise NotImplementedError

    def measure(self, params: Any, ctx: JobContext) -> Any:
        raise NotImplementedError

    def noised(self, params: Any, ctx: JobContext, noise: privacy.Noise) -> Any:
        """The worker's state with differentially private noise in it."""
        raise PrivacyRefused(
            f"{self.name} has no differentially private form: it runs only where the site "
            "answers exactly, without epsilon"
        )

    def exact(self, params: Any, ctx: JobContext) -> None:
        """Refuse an exact answer the site's policy does not allow."""
        privacy.require_exact(ctx.dataset(), self.name)

    def planned(self, params: Any, ctx: JobContext) -> list[Request] | None:
        """The aggregates `measure` or `noised` asks of the data, if it asks only those: a
        job of several such operations (summary.py) answers them all in one scan."""
        return None

    def unpaid(self, params: Any, ctx: JobContext) -> Any:
        """The state that leaves the worker, exact or noised, not yet paid for."""
        noise = privacy.requested(params)
        if noise is None:
            self.exact(params, ctx)
            return self.measure(params, ctx)
        return self.noised(params, ctx, noise)

    def own(self, params: Any, ctx: JobContext) -> Any:
        state = self.unpaid(params, ctx)
        noise = privacy.requested(params)
        if noise is not None:
            # Paid for once computed (a job that fails costs nothing), before it can leave.
            data = ctx.dataset()
            privacy.charge(data, ctx.budget, noise)
        return state

    def merge(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def finalize(self, params: Any, state: Any) -> Any:
        return state

    def initialize(self, params: Any, ctx: JobContext) -> Any:
        return self.empty(params)

    def local(self, params: Any, ctx: JobContext) -> Any:
        return functools.reduce(self.merge, ctx.inputs, self.own(params, ctx))

    def aggregate(self, params: Any, ctx: JobContext) -> Any:
        return self.finalize(params, functools.reduce(self.merge, ctx.inputs, self.empty(params)))

    def iterable(self, role: JobRole) -> bool:
        """Only the start ignores its inputs: the other parts merge the states of one round,
        and a previous round's product is a finalised result, not such a state."""
        return role is JobRole.INITIALIZE


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
        return masking.start(ctx, self._size(params))

    def local(self, params: Any, ctx: JobContext) -> Any:
        if not params.masked:
            return super().local(params, ctx)
        return masking.add(ctx, self.to_ints(self.own(params, ctx)))

    def aggregate(self, params: Any, ctx: JobContext) -> Any:
        if not params.masked:
            return super().aggregate(params, ctx)
        ints = masking.remove(ctx, self._size(params))
        return self.finalize(params, self.from_ints(ints))


# --- parameters -------------------------------------------------------------------------


class Rows(privacy.Private):
    """Which rows: a filter from a Query (`Query.params()` fills `where` and `columns`),
    and the noise asked for (`epsilon`, `delta`, `bounds`: see privacy)."""

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

    def shaped(self, per_column: list[Any]) -> Any:
        """The per-column results as asked: one value for `column`, a dict for `columns`."""
        if self.column is not None:
            return per_column[0]
        return dict(zip(self.targets(), per_column, strict=True))


class MaskableColumns(Columns):
    masked: bool = False  # run masked in a Sequential step (masking.py)


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

    # A statistic the engine computes says which aggregates of a column it needs, and
    # makes its state from them; the others are updated batch by batch.
    clips: ClassVar[bool] = False  # noised, its values are clipped to the column's bounds

    def column_aggs(
        self, params: Any, column: str, limits: tuple[float, float] | None
    ) -> list[Agg] | None:
        return None

    def from_aggs(self, params: Any, found: list[Any], n: int) -> Any:
        raise NotImplementedError

    def limits(self, params: Columns, ctx: JobContext) -> list[tuple[float, float]] | None:
        """Each column's clipping bounds, for a noised statistic that clips."""
        if not self.clips or privacy.requested(params) is None:
            return None
        return [privacy.bounds(params, ctx.dataset(), c) for c in params.targets()]

    def requests(
        self, params: Columns, limits: list[tuple[float, float]] | None
    ) -> list[Request] | None:
        aggs: list[Agg] = []
        for i, column in enumerate(params.targets()):
            wanted = self.column_aggs(params, column, None if limits is None else limits[i])
            if wanted is None:
                return None
            aggs += [Agg("present", column), *wanted]
        return [Request(params.where, (), tuple(aggs))]

    def planned(self, params: Columns, ctx: JobContext) -> list[Request] | None:
        self._check(params, ctx)
        return self.requests(params, self.limits(params, ctx))

    def _check(self, params: Columns, ctx: JobContext) -> None:
        targets = params.targets()
        checked(ctx.dataset(), targets, params.where, numbers=targets)

    def cells(self, params: Any, state: Any, n: int) -> list[int]:
        """The row counts this state discloses."""
        return [n]

    def empty(self, params: Columns) -> list[Any]:
        return [self.start(params) for _ in params.targets()]

    def states(
        self, params: Columns, ctx: JobContext, limits: list[tuple[float, float]] | None = None
    ) -> tuple[list[Any], list[int]]:
        """Each column's state and count of values, the values clipped to `limits`."""
        data = ctx.dataset()
        targets = params.targets()
        requests = self.requests(params, limits)
        if requests is not None:
            self._check(params, ctx)
            return self._from_groups(params, data.aggregate(requests)[0])
        states = self.empty(params)
        counts = [0] * len(targets)
        for batch in select(data, targets, params.where, numbers=targets):
            for i, column in enumerate(targets):
                numbers = values(batch, column)
                if limits is not None:
                    numbers = privacy.clip(numbers, limits[i])
                counts[i] += len(numbers)
                states[i] = self.update(params, states[i], numbers)
        return states, counts

    def _from_groups(self, params: Columns, groups: Groups) -> tuple[list[Any], list[int]]:
        found = groups[()]
        states, counts, at = [], [], 0
        for column in params.targets():
            width = len(self.column_aggs(params, column, None) or [])
            n = int(found[at])
            counts.append(n)
            states.append(self.from_aggs(params, found[at + 1 : at + 1 + width], n))
            at += 1 + width
        return states, counts

    def measure(self, params: Columns, ctx: JobContext) -> list[Any]:
        states, counts = self.states(params, ctx)
        for state, n in zip(states, counts, strict=True):
            for rows in self.cells(params, state, n):
                ctx.dataset().release(rows)
        return states

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return [self.combine(x, y) for x, y in zip(a, b, strict=True)]

    def finalize(self, params: Columns, state: list[Any]) -> Any:
        return privacy.released(params.shaped([self.result(params, s) for s in state]), params)
