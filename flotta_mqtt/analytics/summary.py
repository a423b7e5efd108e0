"""`summary`: several statistics of a dataset in one job, answered by one scan of it.

A step runs one operation; a summary's params name several statistics, each with its own
params, keyed by names the analyst chooses:

    q = Query()[Query()["x"] > 0.5].params()
    Operation("summary", {"operations": {
        "n": {"name": "count", "params": q},
        "m": {"name": "mean", "params": {"column": "y", **q}},
    }})

and the result has the same keys. A worker gathers the aggregates every statistic asks
for, answers them all with one scan of its data (plan.py), then makes each statistic's
state as it would alone: exact where the site allows it, or noised, the epsilons of the
noised ones paid together, once, before anything leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from flotta_mqtt.analytics import privacy
from flotta_mqtt.analytics.estimators import Estimator
from flotta_mqtt.analytics.plan import Groups, Request
from flotta_mqtt.analytics.registry import (
    Dataset,
    JobContext,
    OperationDef,
    OperationError,
    lookup,
    register,
)
from flotta_mqtt.model import JobRole, Operation


class SummaryParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operations: dict[str, Operation] = Field(min_length=1)


class Answered(Dataset):
    """A dataset whose aggregates for a job's requests are already computed."""

    def __init__(self, data: Dataset, answers: dict[Request, Groups]) -> None:
        super().__init__(data.project, data.node, data.min_group_size, data.privacy)
        self.data = data
        self.answers = answers
        self.categories = data.categories

    def schema(self) -> pa.Schema:
        return self.data.schema()

    def batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        return self.data.batches(columns)

    def count_rows(self) -> int:
        return self.data.count_rows()

    def aggregate(self, requests: Sequence[Request]) -> list[Groups]:
        return [self.answers[r] for r in requests]


Part = tuple[str, Estimator, Any]


@register
class Summary(OperationDef):
    name: ClassVar[str] = "summary"
    Params = SummaryParams

    def parts(self, params: SummaryParams) -> list[Part]:
        parts = []
        for key, operation in params.operations.items():
            definition, sub = lookup(operation)
            if not isinstance(definition, Estimator) or getattr(sub, "masked", False):
                raise OperationError(
                    f"summary: {key} ({operation.name}) is not a statistic a summary computes "
                    "(count, sum, mean, min, max, histogram, group_count, group_mean; unmasked)"
                )
            parts.append((key, definition, sub))
        return parts

    def initialize(self, params: SummaryParams, ctx: JobContext) -> dict[str, Any]:
        return {key: definition.empty(sub) for key, definition, sub in self.parts(params)}

    def local(self, params: SummaryParams, ctx: JobContext) -> dict[str, Any]:
        parts = self.parts(params)
        requests: list[Request] = []
        for key, definition, sub in parts:
            if privacy.requested(sub) is None:
                definition.exact(sub, ctx)  # refused before anything is read
            planned = definition.planned(sub, ctx)
            if planned is None:
                raise OperationError(
                    f"summary: {key} ({definition.name}) needs the rows, not aggregates: "
                    "run it as a step of its own"
                )
            requests += planned
        data = ctx.dataset()
        answers = dict(zip(requests, data.aggregate(requests), strict=True))
        answered = dataclasses.replace(ctx, data=Answered(data, answers))
        states = {key: definition.unpaid(sub, answered) for key, definition, sub in parts}
        noises = [n for _, _, sub in parts if (n := privacy.requested(sub)) is not None]
        if noises:  # sequential composition: what the parts spend, added up
            spent = privacy.Noise(sum(n.epsilon for n in noises), sum(n.delta for n in noises))
            privacy.charge(data, ctx.budget, spent)
        return self._merged(parts, [states, *ctx.inputs])

    def aggregate(self, params: SummaryParams, ctx: JobContext) -> dict[str, Any]:
        parts = self.parts(params)
        merged = self._merged(parts, [self.initialize(params, ctx), *ctx.inputs])
        return {key: definition.finalize(sub, merged[key]) for key, definition, sub in parts}

    def _merged(self, parts: list[Part], states: list[dict[str, Any]]) -> dict[str, Any]:
        merged = states[0]
        for other in states[1:]:
            merged = {key: d.merge(merged[key], other[key]) for key, d, _ in parts}
        return merged

    def iterable(self, role: JobRole) -> bool:
        return role is JobRole.INITIALIZE
