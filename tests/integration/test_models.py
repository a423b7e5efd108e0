"""Federated training end to end, on the cluster of test_analytics.py (same module fixture).

The oracle for each model is the same kind of model trained on the pooled training rows
(each worker's split recomputed here from the artifact's seed) and scored on the pooled
test rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import test_analytics
from sklearn.linear_model import LinearRegression as PooledLinear
from sklearn.linear_model import LogisticRegression as PooledLogistic
from test_analytics import TIMEOUT, Nodes

from flotta_mqtt import (
    Artifact,
    ArtifactFailed,
    Collect,
    Distribute,
    Finalize,
    Iterate,
    Operation,
    Parallel,
)
from flotta_mqtt.analytics.models import is_test

pytestmark = pytest.mark.integration

nodes = test_analytics.nodes  # the cluster fixture, one per module

SEED = 4242
FEATURES = ["f1", "f2"]


def training(project: str, name: str, rounds: int, **params: Any) -> Artifact:
    """`rounds` of train → average, then one round scoring the final model on every worker."""
    train = Operation(name=name, params={"features": FEATURES, **params})
    score = Operation(name=name, params={"features": FEATURES, **params, "train": False})
    return Artifact(
        project=project,
        seed=SEED,
        steps=[
            Iterate(
                rounds, [Parallel(train, Collect()), Finalize(train)], distribution=Distribute()
            ),
            Parallel(score, Collect()),
            Finalize(score),
        ],
    )


def split(nodes: Nodes, project: str, label: str) -> tuple[np.ndarray, ...]:
    """Pooled (train x, train y, test x, test y), each worker split as the workers do."""
    parts: list[list[np.ndarray]] = [[], [], [], []]
    for share in nodes.shares[project].values():
        x = np.column_stack([share.column(f).to_numpy() for f in FEATURES])
        y = share.column(label).to_numpy()
        test = is_test(np.arange(share.num_rows), SEED, 0.2)
        for i, piece in enumerate((x[~test], y[~test], x[test], y[test])):
            parts[i].append(piece)
    return tuple(np.concatenate(p) for p in parts)


def test_federated_logistic_regression_is_within_two_points_of_pooled_training(
    nodes: Nodes,
) -> None:
    handle = nodes.client.submit(training("models", "logistic_regression", 3, label="label"))
    result = handle.result(timeout=TIMEOUT)
    train_x, train_y, test_x, test_y = split(nodes, "models", "label")
    pooled = PooledLogistic(C=1e4).fit(train_x, train_y)
    pooled_accuracy = pooled.score(test_x, test_y)

    metrics = result["metrics"]
    assert metrics["n"] == len(test_y)  # every worker's test split, merged
    assert abs(metrics["accuracy"] - pooled_accuracy) <= 0.02, (metrics, pooled_accuracy)
    assert metrics["auc"] > 0.85 and 0 < metrics["precision"] <= 1 and 0 < metrics["recall"] <= 1
    predicted = pooled.predict(test_x)
    assert math.isclose(
        metrics["precision"], (predicted & test_y).sum() / predicted.sum(), abs_tol=0.03
    )
    # The merged model itself: close to the pooled one, trained on every training row.
    assert result["n"] == 0 and result["round"] == 0  # the scoring round trains nothing
    model = result["model"]
    np.testing.assert_allclose(model["coef"], pooled.coef_[0], atol=0.15)
    assert math.isclose(model["intercept"], pooled.intercept_[0], abs_tol=0.15)


def test_federated_linear_regression_matches_pooled_least_squares(nodes: Nodes) -> None:
    handle = nodes.client.submit(training("models", "linear_regression", 1, label="target"))
    result = handle.result(timeout=TIMEOUT)
    train_x, train_y, test_x, test_y = split(nodes, "models", "target")
    pooled = PooledLinear().fit(train_x, train_y)
    np.testing.assert_allclose(result["model"]["coef"], pooled.coef_, atol=0.02)
    assert math.isclose(result["model"]["intercept"], pooled.intercept_, abs_tol=0.02)
    residuals = test_y - pooled.predict(test_x)
    mse = float(np.mean(residuals**2))
    assert math.isclose(result["metrics"]["mse"], mse, rel_tol=0.02)
    assert math.isclose(result["metrics"]["r2"], pooled.score(test_x, test_y), abs_tol=0.01)
    assert result["metrics"]["n"] == len(test_y)


def test_the_merged_forest_holds_every_workers_trees_and_scores_like_them(nodes: Nodes) -> None:
    params = {"label": "label", "trees": 10, "max_depth": 6}
    handle = nodes.client.submit(training("pair", "random_forest", 1, **params))
    result = handle.result(timeout=TIMEOUT)
    model = result["model"]
    assert len(model["trees"]) == 2 * 10  # two workers hold project "pair"
    assert model["classes"] == [0, 1]
    _, _, _, test_y = split(nodes, "pair", "label")
    assert result["metrics"]["n"] == len(test_y)
    assert result["metrics"]["accuracy"] > 0.75 and result["metrics"]["auc"] > 0.8


def test_training_refuses_a_label_that_is_not_binary(nodes: Nodes) -> None:
    handle = nodes.client.submit(training("models", "logistic_regression", 1, label="target"))
    with pytest.raises(ArtifactFailed, match=r"worker w\d: label column target .* must hold 0/1"):
        handle.result(timeout=TIMEOUT)
