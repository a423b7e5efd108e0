"""Linear models: linear and logistic regression, trained on each worker and averaged
coefficient-wise, weighted by training rows (federated averaging).

Each streams its data: one pass per least-squares solve or Newton step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from flotta_mqtt.analytics.models import (
    Model,
    ModelParams,
    classifier_state,
    design,
    merge_metrics,
    regressor_state,
    train_rows,
)
from flotta_mqtt.analytics.registry import (
    ColumnTypeError,
    Dataset,
    JobContext,
    OperationError,
    register,
)


class LinearParams(ModelParams):
    l2: float = Field(default=0.0, ge=0)  # ridge penalty on the coefficients, per row


class LogisticParams(ModelParams):
    l2: float = Field(default=1e-4, ge=0)  # keeps separable data from diverging
    local_steps: int = Field(default=5, ge=1, le=100)  # Newton steps per round, per worker


def _with_intercept(x: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones(len(x)), x])


def _penalty(size: int, l2: float) -> np.ndarray:
    """The L2 penalty's matrix: every coefficient but the intercept is shrunk."""
    penalty = np.eye(size) * l2
    penalty[0, 0] = 0.0
    return penalty


def _solve(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """The least-squares solution: defined even when a worker's features are collinear."""
    return np.asarray(np.linalg.lstsq(matrix, vector, rcond=None)[0])


class LinearModel(Model):
    """A linear predictor `intercept + coef · x`, averaged coefficient-wise, weighted by n."""

    def combine(self, models: list[Any], weights: list[int]) -> dict[str, Any]:
        thetas = [[m["intercept"], *m["coef"]] for m in models]
        return _model(np.average(np.asarray(thetas), axis=0, weights=weights))


def _theta(model: dict[str, Any] | None, features: int) -> np.ndarray:
    if model is None:
        return np.zeros(features + 1)
    if len(model["coef"]) != features:
        raise OperationError(f"the model has {len(model['coef'])} coefficients, not {features}")
    return np.asarray([model["intercept"], *model["coef"]], dtype=np.float64)


def _model(theta: np.ndarray) -> dict[str, Any]:
    return {"intercept": float(theta[0]), "coef": [float(c) for c in theta[1:]]}


@register
class LinearRegression(LinearModel):
    """Least squares (ridge with `l2`), solved exactly on each worker; averaged."""

    name: ClassVar[str] = "linear_regression"
    Params = LinearParams

    def fit(self, params: LinearParams, ctx: JobContext, start: Any) -> tuple[Any, int]:
        d = len(params.features) + 1
        gram, moment, n = np.zeros((d, d)), np.zeros(d), 0
        for x, y, test in design(ctx.dataset(), params, ctx.job.seed):
            a = _with_intercept(x[~test])
            gram += a.T @ a
            moment += a.T @ y[~test]
            n += len(a)
        train_rows(ctx.dataset(), n)
        return _model(_solve(gram + _penalty(d, params.l2 * n), moment)), n

    def score(self, params: LinearParams, ctx: JobContext, model: Any) -> dict[str, Any]:
        theta = _theta(model, len(params.features))
        state = regressor_state(np.empty(0), np.empty(0))
        for x, y, test in design(ctx.dataset(), params, ctx.job.seed):
            state = merge_metrics(state, regressor_state(_with_intercept(x[test]) @ theta, y[test]))
        return state


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -500, 500))))


def _binary(data: Dataset, column: str, y: np.ndarray) -> np.ndarray:
    if not np.isin(y, (0.0, 1.0)).all():
        raise ColumnTypeError(
            f"worker {data.node}: label column {column} of project {data.project} must hold "
            "0/1 (or booleans) for a logistic regression"
        )
    return y


@register
class LogisticRegression(LinearModel):
    """L2-penalised logistic regression: Newton steps on each worker, averaged by n.

    Newton's method is insensitive to the features' scales, so no federated
    standardisation round is needed; each step is one pass over the worker's data.
    """

    name: ClassVar[str] = "logistic_regression"
    Params = LogisticParams

    def fit(self, params: LogisticParams, ctx: JobContext, start: Any) -> tuple[Any, int]:
        data = ctx.dataset()
        d = len(params.features) + 1
        theta = _theta(start, len(params.features))
        penalty = _penalty(d, params.l2)
        n = 0
        for _ in range(params.local_steps):
            hessian, gradient, n = np.zeros((d, d)), np.zeros(d), 0
            for x, y, test in design(data, params, ctx.job.seed):
                a, target = _with_intercept(x[~test]), _binary(data, params.label, y[~test])
                p = _sigmoid(a @ theta)
                gradient += a.T @ (p - target)
                hessian += (a * (p * (1 - p))[:, None]).T @ a
                n += len(a)
            train_rows(data, n)
            step = _solve(hessian / n + penalty, gradient / n + penalty @ theta)
            theta = theta - step
        return _model(theta), n

    def score(self, params: LogisticParams, ctx: JobContext, model: Any) -> dict[str, Any]:
        data = ctx.dataset()
        theta = _theta(model, len(params.features))
        scores: list[np.ndarray] = []
        actual: list[np.ndarray] = []
        for x, y, test in design(data, params, ctx.job.seed):
            scores.append(_sigmoid(_with_intercept(x[test]) @ theta))
            actual.append(_binary(data, params.label, y[test]))
        p, y_ = np.concatenate(scores or [np.empty(0)]), np.concatenate(actual or [np.empty(0)])
        return classifier_state((p >= 0.5).astype(np.float64), y_, p)
