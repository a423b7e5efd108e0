"""Federated models: what every model shares — parameters, a seeded train/test split,
mergeable metrics, and the round structure.

Train with `Iterate(rounds, [Parallel(op, Collect()), Finalize(op)])`: each round's local
jobs score the model the previous round produced on their test split and train from it;
the Finalize merges the workers' models. For the metrics of the final model add an
evaluation round with `train=false`. The models are in `linear` and `forest`; every
model is plain JSON, so none is ever unpickled.

A local product is `{"model", "n" (training rows), "metrics" (a mergeable state)}`; the
Finalize's is `{"model", "n", "metrics" (plain numbers, or null), "round"}`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from flotta_mqtt.analytics import privacy
from flotta_mqtt.analytics.estimators import Rows
from flotta_mqtt.analytics.filters import select_numbered
from flotta_mqtt.analytics.registry import (
    Dataset,
    JobContext,
    OperationDef,
    OperationError,
    PrivacyRefused,
)
from flotta_mqtt.analytics.statistics import chan, moments

# --- parameters ---------------------------------------------------------------------------


class ModelParams(Rows):
    features: list[str] = Field(min_length=1)
    label: str = Field(min_length=1)
    test_fraction: float = Field(default=0.2, ge=0, lt=1)
    train: bool = True  # false: only score the model received (an evaluation round)


# --- data: a seeded split, streamed -------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a good 64-bit hash, vectorised (uint64 arithmetic wraps)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.asarray(x ^ (x >> np.uint64(31)))


def is_test(rows: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Whether each row (by position) is in the test split: a hash of the seed and row."""
    salt = _splitmix(np.array([seed & _MASK64], dtype=np.uint64))[0]
    uniform = (_splitmix(rows.astype(np.uint64) ^ salt) >> np.uint64(11)) * 2.0**-53
    return np.asarray(uniform < fraction)


def _column(batch: pa.RecordBatch, name: str, numeric: bool) -> np.ndarray:
    """A column as numpy: float64 with NaN for missing values, or as it comes (labels)."""
    array = batch.column(name)
    if numeric:
        array = pc.cast(array, pa.float64())
    return np.asarray(array.to_numpy(zero_copy_only=False))


def _present(data: np.ndarray) -> np.ndarray:
    if data.dtype == object:
        return np.asarray([v is not None for v in data], dtype=bool)
    return np.asarray(~np.isnan(data))


def design(
    data: Dataset, params: ModelParams, seed: int, numeric_label: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(features, label, is-test) of the complete rows passing the filter, batch by batch."""
    columns = [*params.features, params.label]
    numbers = columns if numeric_label else params.features
    for batch, rows in select_numbered(data, columns, params.where, numbers=numbers):
        x = np.column_stack([_column(batch, f, True) for f in params.features])
        y = _column(batch, params.label, numeric_label)
        complete = ~np.isnan(x).any(axis=1) & _present(y)
        yield x[complete], y[complete], is_test(rows[complete], seed, params.test_fraction)


# --- metrics, as mergeable states -----------------------------------------------------------


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classifier_state(
    predicted: np.ndarray, actual: np.ndarray, scores: np.ndarray | None
) -> dict[str, Any]:
    """Counts for accuracy; for two classes (scores given) also precision, recall, AUC.

    A worker's AUC weighs in by its (positive, negative) pairs: the merged AUC is the
    pooled one over pairs within a worker.
    """
    state: dict[str, Any] = {"n": len(actual), "correct": int((predicted == actual).sum())}
    if scores is not None:
        pos, said = actual.astype(bool), predicted.astype(bool)
        area = auc(scores, pos)
        pairs = int(pos.sum()) * int((~pos).sum())
        state.update(
            tp=int((said & pos).sum()),
            fp=int((said & ~pos).sum()),
            fn=int((~said & pos).sum()),
            pairs=pairs if area is not None else 0,
            auc_sum=area * pairs if area is not None else 0.0,
        )
    return state


def regressor_state(predicted: np.ndarray, actual: np.ndarray) -> dict[str, Any]:
    """Squared errors and the label's moments: MSE and R² of the pooled test rows."""
    return {"n": len(actual), "sse": float(np.sum((predicted - actual) ** 2)), "y": moments(actual)}


def merge_metrics(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: chan(a[k], b[k]) if k == "y" else a[k] + b[k] for k in a}


def _ratio(top: float, bottom: float) -> float | None:
    return top / bottom if bottom else None


def finish_metrics(state: dict[str, Any]) -> dict[str, Any]:
    n = state["n"]
    if "sse" in state:
        sse, total = state["sse"], state["y"][2]
        return {"n": n, "mse": _ratio(sse, n), "r2": 1 - sse / total if total else None}
    result = {"n": n, "accuracy": _ratio(state["correct"], n)}
    if "tp" in state:
        tp = state["tp"]
        result.update(
            precision=_ratio(tp, tp + state["fp"]),
            recall=_ratio(tp, tp + state["fn"]),
            auc=_ratio(state["auc_sum"], state["pairs"]),
        )
    return result


# --- the round structure shared by every model --------------------------------------------


class Model(OperationDef):
    """A federated model: a local part (score what it receives, train) and a merge."""

    def fit(self, params: Any, ctx: JobContext, start: Any) -> tuple[Any, int]:
        """Train on the worker's training split from `start` (None: from scratch)."""
        raise NotImplementedError

    def score(self, params: Any, ctx: JobContext, model: Any) -> dict[str, Any]:
        """The metrics state of `model` on the worker's test split."""
        raise NotImplementedError

    def combine(self, models: list[Any], weights: list[int]) -> Any:
        raise NotImplementedError

    def local(self, params: ModelParams, ctx: JobContext) -> dict[str, Any]:
        # A model and its metrics are exact: only where the site answers exactly.
        if params.epsilon is not None:
            raise PrivacyRefused(f"{self.name} has no differentially private form")
        privacy.require_exact(ctx.dataset(), self.name)
        received = ctx.inputs[0]["model"] if ctx.inputs else None
        metrics = None if received is None else self.score(params, ctx, received)
        if metrics is not None:
            ctx.dataset().release(metrics["n"])
        if not params.train:
            if received is None:
                raise OperationError(f"{ctx.node}: train=false scores a model, but none came in")
            return {"model": received, "n": 0, "metrics": metrics}
        model, n = self.fit(params, ctx, received)
        return {"model": model, "n": n, "metrics": metrics}

    def aggregate(self, params: ModelParams, ctx: JobContext) -> dict[str, Any]:
        if not ctx.inputs:
            raise OperationError(f"{self.name}: the Finalize received no worker's model")
        updates = [p for p in ctx.inputs if p["n"] > 0]
        model = (
            self.combine([p["model"] for p in updates], [p["n"] for p in updates])
            if updates
            else ctx.inputs[0]["model"]
        )
        scored = [p["metrics"] for p in ctx.inputs if p["metrics"] is not None]
        metrics = finish_metrics(functools.reduce(merge_metrics, scored)) if scored else None
        n = sum(p["n"] for p in ctx.inputs)
        return {"model": model, "n": n, "metrics": metrics, "round": ctx.job.iteration}


def train_rows(data: Dataset, n: int) -> None:
    if n == 0:
        raise OperationError(f"worker {data.node}: no training rows pass the filter")
    data.release(n)
