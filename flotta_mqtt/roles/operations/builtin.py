"""Built-in operations: estimators over local data (count, sum, mean) and test helpers."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from flotta_mqtt.model import Filter
from flotta_mqtt.roles.operations.registry import (
    Dataset,
    JobContext,
    OperationDef,
    OperationError,
    register,
)


class Estimator(OperationDef):
    """A statistic split into a local part and an exact merge.

    Each worker measures its own rows into a small state and merges it with the states it
    consumes; the initiator starts from the empty state and finalises the merged one. The
    same operation therefore serves Parallel → Collect → Finalize and Sequential alike.
    """

    def empty(self) -> Any:
        raise NotImplementedError

    def measure(self, params: Any, data: Dataset) -> Any:
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def finalize(self, state: Any) -> Any:
        return state

    def initialize(self, params: Any, ctx: JobContext) -> Any:
        return self.empty()

    def local(self, params: Any, ctx: JobContext) -> Any:
        return functools.reduce(self.merge, ctx.inputs, self.measure(params, ctx.dataset()))

    def aggregate(self, params: Any, ctx: JobContext) -> Any:
        return self.finalize(functools.reduce(self.merge, ctx.inputs, self.empty()))


class FilterParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    where: Filter | None = None


class ColumnParams(FilterParams):
    column: str = Field(min_length=1)


def selected_rows(data: Dataset, where: Filter | None, needed: set[str]) -> Any:
    """The rows of `data` that pass `where`, after checking every column exists."""
    data.require(needed | (where.columns() if where is not None else set()))
    if where is None:
        return data.rows()
    return (row for row in data.rows() if where.matches(row))


def numbers(data: Dataset, params: ColumnParams) -> Any:
    for row in selected_rows(data, params.where, {params.column}):
        value = row[params.column]
        if not isinstance(value, int | float):
            raise OperationError(
                f"worker {data.node}: column {params.column} holds {value!r}, not a number"
            )
        yield value


@register
class Count(Estimator):
    name: ClassVar[str] = "count"
    Params = FilterParams

    def empty(self) -> int:
        return 0

    def measure(self, params: FilterParams, data: Dataset) -> int:
        return sum(1 for _ in selected_rows(data, params.where, set()))

    def merge(self, a: int, b: int) -> int:
        return a + b


@register
class Sum(Estimator):
    name: ClassVar[str] = "sum"
    Params = ColumnParams

    def empty(self) -> float:
        return 0.0

    def measure(self, params: ColumnParams, data: Dataset) -> float:
        return float(sum(numbers(data, params)))

    def merge(self, a: float, b: float) -> float:
        return a + b


@register
class Mean(Estimator):
    name: ClassVar[str] = "mean"
    Params = ColumnParams

    def empty(self) -> dict[str, float]:
        return {"sum": 0.0, "count": 0}

    def measure(self, params: ColumnParams, data: Dataset) -> dict[str, float]:
        total, count = 0.0, 0
        for value in numbers(data, params):
            total += value
            count += 1
        return {"sum": total, "count": count}

    def merge(self, a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {"sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}

    def finalize(self, state: dict[str, float]) -> float | None:
        return state["sum"] / state["count"] if state["count"] else None


@register
class Noop(OperationDef):
    """Does nothing and produces nothing: measures the engine's own overhead."""

    name: ClassVar[str] = "noop"

    def initialize(self, params: Any, ctx: JobContext) -> None:
        return None

    def local(self, params: Any, ctx: JobContext) -> None:
        return None

    def aggregate(self, params: Any, ctx: JobContext) -> None:
        return None


@register
class Trail(OperationDef):
    """Appends each node's name to the trail it receives: shows the path products took."""

    name: ClassVar[str] = "trail"

    def _extend(self, ctx: JobContext) -> dict[str, Any]:
        trail: list[str] = []
        for product in ctx.inputs:
            trail += product["trail"]
        return {"trail": [*trail, ctx.node], "iteration": ctx.job.iteration}

    def initialize(self, params: Any, ctx: JobContext) -> dict[str, Any]:
        return self._extend(ctx)

    def local(self, params: Any, ctx: JobContext) -> dict[str, Any]:
        return self._extend(ctx)

    def aggregate(self, params: Any, ctx: JobContext) -> dict[str, Any]:
        return self._extend(ctx)
