"""Federated models: linear and logistic regression by federated averaging, and a random
forest merged from the workers' trees.

Train with `Iterate(rounds, [Parallel(op, Collect()), Finalize(op)])`: each round's local
jobs consume the model the previous round's Finalize produced and start from it (round 0
starts from zeros); the Finalize averages the workers' models weighted by their training
rows (a forest concatenates their trees). Every local job first scores the model it
receives on its test split, so each round's product carries the metrics of the model the
round started from. For the metrics of the final model add an evaluation round:
`Iterate(..., Distribute())`, then `Parallel(op with train=false, Collect())` and
`Finalize(op with train=false)`.

Each worker splits its rows into train and test with the artifact's seed, by a hash of
each row's position in its data, so a split is the same in every round and job. Rows with
a missing feature or label are left out. Linear models stream their data (one pass per
Newton step); the forest holds its training split in memory.

A local product is `{"model", "n" (training rows), "metrics" (a mergeable state)}`; the
Finalize's is `{"model", "n", "metrics" (plain numbers, or null), "round"}`. Models are
plain JSON arrays, so no model is ever unpickled; forest trees are scikit-learn's arrays.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from flotta_mqtt.analytics.estimators import Rows, chan, moments
from flotta_mqtt.analytics.filters import select_numbered
from flotta_mqtt.analytics.registry import (
    ColumnTypeError,
    Dataset,
    JobContext,
    OperationDef,
    OperationError,
    register,
)

# --- parameters ---------------------------------------------------------------------------


class ModelParams(Rows):
    features: list[str] = Field(min_length=1)
    label: str = Field(min_length=1)
    test_fraction: float = Field(default=0.2, ge=0, lt=1)
    train: bool = True  # false: only score the model received (an evaluation round)


class LinearParams(ModelParams):
    l2: float = Field(default=0.0, ge=0)  # ridge penalty on the coefficients, per row


class LogisticParams(ModelParams):
    l2: float = Field(default=1e-4, ge=0)  # keeps separable data from diverging
    local_steps: int = Field(default=5, ge=1, le=100)  # Newton steps per round, per worker


class ForestParams(ModelParams):
    task: Literal["classification", "regression"] = "classification"
    trees: int = Field(default=10, ge=1, le=1000)  # per worker
    max_depth: int | None = Field(default=None, ge=1)
    # Raised to the project's min_group_size, so that no leaf describes fewer rows.
    min_samples_leaf: int = Field(default=1, ge=1)


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
        received = ctx.inputs[0]["model"] if ctx.inputs else None
        metrics = None if received is None else self.score(params, ctx, received)
        if metrics is not None:
            ctx.dataset().release(metrics["n"], "the test split")
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


def _train_rows(data: Dataset, n: int) -> None:
    if n == 0:
        raise OperationError(f"worker {data.node}: no training rows pass the filter")
    data.release(n, "the training split")


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
        _train_rows(ctx.dataset(), n)
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
            _train_rows(data, n)
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


# --- random forest ------------------------------------------------------------------------


def _tree_json(tree: Any, classifier: bool) -> dict[str, Any]:
    """scikit-learn's tree arrays as JSON; leaves hold class probabilities or a value."""
    values = tree.value[:, 0, :]
    if classifier:
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1e-300)
        leaf = values.tolist()
    else:
        leaf = values[:, 0].tolist()
    return {
        "left": tree.children_left.tolist(),
        "right": tree.children_right.tolist(),
        "feature": tree.feature.tolist(),
        "threshold": tree.threshold.tolist(),
        "value": leaf,
    }


def leaves(tree: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """The leaf each row of `x` falls in: all rows descend the tree together."""
    left, right = np.asarray(tree["left"]), np.asarray(tree["right"])
    feature, threshold = np.asarray(tree["feature"]), np.asarray(tree["threshold"])
    node = np.zeros(len(x), dtype=np.int64)
    rows = np.arange(len(x))
    while True:
        inner = left[node] != -1
        if not inner.any():
            return node
        go_left = x[rows, np.where(inner, feature[node], 0)] <= threshold[node]
        node = np.where(inner, np.where(go_left, left[node], right[node]), node)


def forest_predict(model: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """Class probabilities (rows by classes) or values: the mean over the forest's trees."""
    outputs = [np.asarray(tree["value"])[leaves(tree, x)] for tree in model["trees"]]
    return np.asarray(np.mean(outputs, axis=0))


def _align(model: dict[str, Any], classes: list[Any]) -> list[dict[str, Any]]:
    """A classifier's trees with their leaf probabilities laid out over `classes`."""
    where = [classes.index(c) for c in model["classes"]]
    trees = []
    for tree in model["trees"]:
        value = np.zeros((len(tree["value"]), len(classes)))
        value[:, where] = np.asarray(tree["value"])
        trees.append({**tree, "value": value.tolist()})
    return trees


def _in_memory(
    data: Dataset, params: ForestParams, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training x, y and test x, y, held in memory (as scikit-learn needs them)."""
    parts = list(design(data, params, seed, numeric_label=params.task == "regression"))
    x = np.concatenate([p[0] for p in parts] or [np.empty((0, len(params.features)))])
    y = np.concatenate([p[1] for p in parts] or [np.empty(0)])
    test = np.concatenate([p[2] for p in parts] or [np.empty(0, dtype=bool)])
    return x[~test], y[~test], x[test], y[test]


@register
class RandomForest(Model):
    """Each worker grows `trees` trees (scikit-learn, the `ml` extra); the merge keeps all.

    Evaluation needs no scikit-learn: trees are walked from their JSON arrays. For two
    classes the later one (in sorted order: 1, True, or the later string) is the positive.
    """

    name: ClassVar[str] = "random_forest"
    Params = ForestParams

    def fit(self, params: ForestParams, ctx: JobContext, start: Any) -> tuple[Any, int]:
        try:
            from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
        except ImportError:
            raise OperationError(
                f"worker {ctx.node}: random_forest needs scikit-learn "
                "(pip install 'flotta_mqtt[ml]')"
            ) from None
        data = ctx.dataset()
        classifier = params.task == "classification"
        x, y, _, _ = _in_memory(data, params, ctx.job.seed)
        _train_rows(data, len(y))
        options = {
            "n_estimators": params.trees,
            "max_depth": params.max_depth,
            "min_samples_leaf": max(params.min_samples_leaf, data.min_group_size),
            # Without bootstrap a leaf's samples are distinct rows, so the bound above holds.
            "bootstrap": False,
            "random_state": (ctx.job.seed ^ zlib.crc32(ctx.node.encode())) & 0xFFFFFFFF,
        }
        forest = (RandomForestClassifier if classifier else RandomForestRegressor)(**options)
        forest.fit(x, y)
        model: dict[str, Any] = {
            "task": params.task,
            "features": params.features,
            "trees": [_tree_json(e.tree_, classifier) for e in forest.estimators_],
        }
        if classifier:
            model["classes"] = forest.classes_.tolist()
        return model, len(y)

    def score(self, params: ForestParams, ctx: JobContext, model: Any) -> dict[str, Any]:
        _, _, x, truth = _in_memory(ctx.dataset(), params, ctx.job.seed)
        predicted = forest_predict(model, x)
        if params.task == "regression":
            return regressor_state(predicted, truth)
        classes = model["classes"]
        said = np.asarray(classes, dtype=object)[predicted.argmax(axis=1)]
        if len(classes) == 2:
            positive = classes[1]
            return classifier_state(said == positive, truth == positive, predicted[:, 1])
        return classifier_state(said, truth, None)

    def combine(self, models: list[Any], weights: list[int]) -> dict[str, Any]:
        merged = {**models[0], "trees": []}
        if merged["task"] == "classification":
            classes = sorted({c for m in models for c in m["classes"]})
            merged["classes"] = classes
            merged["trees"] = [t for m in models for t in _align(m, classes)]
        else:
            merged["trees"] = [t for m in models for t in m["trees"]]
        return merged
