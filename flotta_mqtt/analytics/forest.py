"""A random forest: each worker grows its trees (scikit-learn), the merge keeps them all.

The forest holds its training split in memory; evaluating it needs no scikit-learn, the
trees being walked from their JSON arrays.
"""

from __future__ import annotations

import zlib
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from flotta_mqtt.analytics.models import (
    Model,
    ModelParams,
    classifier_state,
    design,
    regressor_state,
    train_rows,
)
from flotta_mqtt.analytics.registry import (
    Dataset,
    JobContext,
    OperationError,
    PrivacyRefused,
    register,
)


class ForestParams(ModelParams):
    task: Literal["classification", "regression"] = "classification"
    trees: int = Field(default=10, ge=1, le=1000)  # per worker
    max_depth: int | None = Field(default=None, ge=1)
    # Raised to the project's min_group_size, so that no leaf describes fewer rows.
    min_samples_leaf: int = Field(default=1, ge=1)


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


def declared_labels(data: Dataset, label: str, y: np.ndarray) -> list[Any]:
    """The label's values from the site's schema (`privacy.labels`), sorted; every value
    of `y` must be among them (the error names none of the data's)."""
    labels = data.privacy.labels.get(label)
    if labels is None:
        raise PrivacyRefused(
            f"worker {data.node}: a classifier names its classes, so project {data.project} "
            f"must declare the values of column {label} (privacy.labels in its dataset spec)"
        )
    classes = sorted(labels)
    if not set(np.unique(y).tolist()) <= set(classes):
        raise OperationError(
            f"worker {data.node}: column {label} of project {data.project} holds a value "
            "outside its declared labels"
        )
    return classes


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
        train_rows(data, len(y))
        options = {
            "n_estimators": params.trees,
            "max_depth": params.max_depth,
            "min_samples_leaf": max(params.min_samples_leaf, data.min_group_size),
            # Without bootstrap a leaf's samples are distinct rows, so the bound above holds.
            "bootstrap": False,
            "random_state": (ctx.job.seed ^ zlib.crc32(ctx.node.encode())) & 0xFFFFFFFF,
        }
        classes = declared_labels(data, params.label, y) if classifier else []
        forest = (RandomForestClassifier if classifier else RandomForestRegressor)(**options)
        forest.fit(x, y)
        model: dict[str, Any] = {
            "task": params.task,
            "features": params.features,
            "trees": [_tree_json(e.tree_, classifier) for e in forest.estimators_],
        }
        if classifier:
            # The declared classes, whichever are present: the list discloses nothing.
            present = {"classes": forest.classes_.tolist(), "trees": model["trees"]}
            model.update(classes=classes, trees=_align(present, classes))
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
