"""Federated statistics: counts, means, spread, quantiles, a histogram, groups, masking.

Against running nodes whose workers hold project "demo" (the demo's columns x, y — start
a scheduler and workers as in the README's "Using it"), then:

    python3 examples/federated_stats.py --broker mqtt://127.0.0.1:1883 --storage file://./flotta-store

Standalone — a local mosquitto, a scheduler and three workers in this process, on
generated data that also has `site` and `day` columns, so group statistics and date
filters run too:

    python3 examples/federated_stats.py --local
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import numpy as np
import pyarrow as pa

from flotta_mqtt import (
    Artifact,
    Client,
    Collect,
    Finalize,
    Operation,
    Parallel,
    Query,
    Sequential,
)

PROJECT = "demo"


def generated(rng: np.random.Generator, n: int) -> pa.Table:
    days = np.datetime64("2020-01-01") + rng.integers(0, 730, n)
    return pa.table(
        {
            "x": rng.random(n),
            "y": rng.normal(0.0, 1.0, n),
            "site": rng.choice(["north", "south", "east"], n),
            "day": pa.array(days.astype("datetime64[D]"), pa.date32()),
        }
    )


def federated(client: Client, name: str, **params: Any) -> Any:
    """`name` on every worker → Collect → merged on the initiator; the plain result."""
    operation = Operation(name=name, params=params)
    artifact = Artifact(
        project=PROJECT, steps=[Parallel(operation, Collect()), Finalize(operation)]
    )
    return client.submit(artifact).result(timeout=120)


def main(client: Client) -> None:
    workers = [w for w in client.workers() if not w.initiator and PROJECT in w.projects]
    for worker in workers:  # the schema each worker announces: never its data
        schema = worker.details[PROJECT]
        columns = ", ".join(f"{c['name']}:{c['type']}" for c in schema["columns"])
        print(f"{worker.node}: {schema['rows']} rows ({columns})")
    names = {c["name"] for c in workers[0].details[PROJECT]["columns"]}

    q = Query()
    over = q[q["x"] > 0.5]
    show = {
        "count x > 0.5": federated(client, "count", **over.params()),
        "mean of x, y where x > 0.5": federated(client, "mean", **over[["x", "y"]].params()),
        "std of y": federated(client, "std", column="y"),
        "min, max of y": (
            federated(client, "min", column="y"),
            federated(client, "max", column="y"),
        ),
        "quartiles of y": federated(client, "quantile", column="y", q=[0.25, 0.5, 0.75]),
        "histogram of x": federated(client, "histogram", column="x", edges=[0, 0.25, 0.5, 0.75, 1]),
    }
    # The same sum passed from worker to worker under a random mask: no worker sees the
    # running total of those before it; the initiator removes the mask at the end.
    masked = Operation(name="sum", params={"column": "y", "masked": True})
    show["masked sequential sum of y"] = client.submit(
        Artifact(project=PROJECT, steps=[Sequential(masked)])
    ).result(timeout=120)
    show["sum of y (parallel)"] = federated(client, "sum", column="y")
    if {"site", "day"} <= names:
        recent = q[q["day"] >= date(2021, 1, 1)]
        show["rows per site since 2021"] = federated(
            client, "group_count", by="site", **recent.params()
        )
        show["mean y per site"] = federated(client, "group_mean", by=["site"], column="y")
    for what, value in show.items():
        print(f"{what}: {json.dumps(value)}")


if __name__ == "__main__":
    from _local import options, workbench

    with workbench(options(__doc__), PROJECT, generated) as client:
        main(client)
