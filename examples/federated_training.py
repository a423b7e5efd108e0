"""Federated training: regressions by federated averaging, and a merged random forest.

Every round, each worker trains from the model the previous round produced and the
initiator averages the results; a last round scores the final model on every worker's
test split (split with the artifact's seed) and merges the metrics.

Against running nodes whose workers hold project "demo" (the demo's columns x, y — start
a scheduler and workers as in the README's "Using it"): a linear regression of y on x,
and a regression forest (with the `ml` extra):

    python3 examples/federated_training.py --broker mqtt://127.0.0.1:1883 --storage file://./flotta-store

Standalone — a local mosquitto, a scheduler and three workers in this process, on
generated data with a 0/1 label, so a logistic regression and a classification forest
run too:

    python3 examples/federated_training.py --local
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import numpy as np
import pyarrow as pa

from flotta_mqtt import (
    Artifact,
    Client,
    Collect,
    Distribute,
    Finalize,
    Iterate,
    Operation,
    Parallel,
)

PROJECT = "demo"


def generated(rng: np.random.Generator, n: int) -> pa.Table:
    """x and a linear y, as the demo's columns, plus f1, f2 and a 0/1 label."""
    x, f1, f2 = rng.random(n), rng.normal(0, 1, n), rng.normal(0, 1, n)
    chance = 1 / (1 + np.exp(-(0.3 + 2 * f1 - f2)))
    return pa.table(
        {
            "x": x,
            "y": 1.0 + 3.0 * x + rng.normal(0, 0.3, n),
            "f1": f1,
            "f2": f2,
            "label": (rng.random(n) < chance).astype(np.int64),
        }
    )


def training(name: str, rounds: int, **params: Any) -> Artifact:
    """`rounds` of train → merge, then a round scoring the final model on every worker."""
    train = Operation(name=name, params=params)
    score = Operation(name=name, params={**params, "train": False})
    return Artifact(
        project=PROJECT,
        steps=[
            # Each round's workers consume the model the previous Finalize produced; the
            # Iterate's Distribute hands the last one to the scoring round.
            Iterate(
                rounds, [Parallel(train, Collect()), Finalize(train)], distribution=Distribute()
            ),
            Parallel(score, Collect()),
            Finalize(score),
        ],
    )


def report(what: str, result: dict[str, Any]) -> None:
    model = result["model"]
    shown = {k: v for k, v in model.items() if k != "trees"}
    if "trees" in model:
        shown["trees"] = len(model["trees"])
    print(f"{what}: model {json.dumps(shown)}")
    print(f"    metrics on the workers' test splits: {json.dumps(result['metrics'])}")


def main(client: Client, classification: bool) -> None:
    forests = importlib.util.find_spec("sklearn") is not None
    report(
        "linear regression of y on x",
        client.submit(training("linear_regression", 1, features=["x"], label="y")).result(
            timeout=300
        ),
    )
    if forests:
        report(
            "regression forest of y on x",
            client.submit(
                training("random_forest", 1, features=["x"], label="y", task="regression", trees=10)
            ).result(timeout=300),
        )
    if classification:
        report(
            "logistic regression of label on f1, f2",
            client.submit(
                training("logistic_regression", 5, features=["f1", "f2"], label="label")
            ).result(timeout=300),
        )
        if forests:
            report(
                "classification forest of label on f1, f2",
                client.submit(
                    training("random_forest", 1, features=["f1", "f2"], label="label", trees=10)
                ).result(timeout=300),
            )
    if not forests:
        print("(forests need scikit-learn on the workers: pip install 'flotta_mqtt[ml]')")


if __name__ == "__main__":
    from _local import options, workbench

    arguments = options(__doc__)
    with workbench(arguments, PROJECT, generated) as client:
        main(client, classification=arguments.local)
