"""Estimators, masking, the quantile sketch and file datasets, without a broker.

`federated` runs an operation as the engine would over several workers' datasets —
Parallel → Collect → Finalize, or Sequential — with every product passed through JSON.
Oracles are computed directly on the pooled rows with the standard library and numpy.
"""

from __future__ import annotations

import functools
import json
import math
import random
import statistics
from collections import Counter, defaultdict
from datetime import date
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_query import TableDataset

from flotta_mqtt import analytics as operations
from flotta_mqtt.analytics import (
    REGISTRY,
    DatasetSpec,
    FileDataset,
    JobContext,
    OperationError,
    PrivacyPolicy,
    TooFewRows,
    forest,
    masking,
    models,
    quantiles,
)
from flotta_mqtt.model import Operation
from flotta_mqtt.model.query import Query
from flotta_mqtt.protocol import JobReady

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCHEMA = pa.schema([("v", pa.float64()), ("k", pa.string()), ("j", pa.int64())])
EXACT = PrivacyPolicy(exact=True, release_extremes=True)


def dataset(rows: list[dict[str, Any]], node: str, min_group_size: int = 1) -> TableDataset:
    data = TableDataset(pa.Table.from_pylist(rows, schema=SCHEMA), node=node, batch_rows=5)
    data.min_group_size = min_group_size
    data.privacy = EXACT  # these tests check the exact merge; privacy has its own
    return data


def job(operation: Operation, role: str, job_id: int = 0) -> JobReady:
    return JobReady(
        artifact_id="a1",
        job_id=job_id,
        attempt=1,
        project="p",
        seed=11,
        step="0",
        kind="sequential",
        role=role,
        iteration=0,
        operation=operation,
    )


def part(
    operation: Operation, role: str, inputs: list[Any], data: Any = None, node: str = "i"
) -> Any:
    """One job's product, as the next job would read it (through JSON, as in the store)."""
    context = JobContext(job=job(operation, role), node=node, inputs=inputs, data=data)
    return json.loads(json.dumps(operations.run(context), allow_nan=False))


def federated(name: str, datasets: list[Any], sequential: bool = False, **params: Any) -> Any:
    operation = Operation(name=name, params=params)
    if sequential:
        running = part(operation, "initialize", [])
        for data in datasets:
            running = part(operation, "local", [running], data, data.node)
        return part(operation, "aggregate", [running])
    products = [part(operation, "local", [], data, data.node) for data in datasets]
    return part(operation, "aggregate", products)


def close(a: float | None, b: float | None) -> bool:
    return a is b or (
        a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    )


# --- federated == pooled, for every estimator ------------------------------------------------

VALUES = st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: round(v, 3))
ROW = st.fixed_dictionaries(
    {
        "v": st.one_of(st.none(), VALUES),
        "k": st.sampled_from(["a", "b", "c"]),
        "j": st.integers(0, 2),
    }
)
SPLITS = st.lists(st.lists(ROW, max_size=25), min_size=1, max_size=4)


def pooled_statistics(rows: list[dict[str, Any]], edges: list[float]) -> dict[str, Any]:
    """Every statistic computed directly on the concatenated rows."""
    vs = [r["v"] for r in rows if r["v"] is not None]
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in rows:
        if r["v"] is not None:
            groups[(r["k"], r["j"])].append(r["v"])
    counts = np.histogram(vs, bins=edges)[0].tolist() if vs else [0] * (len(edges) - 1)
    return {
        "count": len(rows),
        "count_v": len(vs),
        "sum": math.fsum(vs),
        "mean": math.fsum(vs) / len(vs) if vs else None,
        "variance": statistics.variance(vs) if len(vs) > 1 else None,
        "std": statistics.stdev(vs) if len(vs) > 1 else None,
        "min": min(vs, default=None),
        "max": max(vs, default=None),
        "histogram": {
            "edges": edges,
            "counts": counts,
            "below": sum(v < edges[0] for v in vs),
            "above": sum(v > edges[-1] for v in vs),
        },
        "group_count": [
            {"k": k, "j": j, "count": n}
            for (k, j), n in sorted(Counter((r["k"], r["j"]) for r in rows).items())
        ],
        "group_mean": [
            {"k": k, "j": j, "count": len(g), "mean": math.fsum(g) / len(g)}
            for (k, j), g in sorted(groups.items())
        ],
    }


@SETTINGS
@given(SPLITS, st.booleans())
def test_every_estimator_merged_over_workers_equals_the_pooled_statistic(
    splits: list[list[dict[str, Any]]], sequential: bool
) -> None:
    datasets = [dataset(rows, f"w{i}") for i, rows in enumerate(splits)]
    rows = [r for split in splits for r in split]
    edges = [-1e5, 0.0, 1e3, 5e5]
    expected = pooled_statistics(rows, edges)

    def run(name: str, **params: Any) -> Any:
        return federated(name, datasets, sequential, **params)

    assert run("count") == expected["count"]
    assert run("count", column="v") == expected["count_v"]
    assert run("count", columns=["v", "k"]) == {"v": expected["count_v"], "k": len(rows)}
    assert run("histogram", column="v", edges=edges) == expected["histogram"]
    assert run("min", column="v") == expected["min"]
    assert run("max", column="v") == expected["max"]
    assert run("group_count", by=["k", "j"]) == expected["group_count"]
    for name in ("sum", "mean", "variance", "std"):
        assert close(run(name, column="v"), expected[name]), name
    means = run("group_mean", by=["k", "j"], column="v")
    assert [(m["k"], m["j"], m["count"]) for m in means] == [
        (m["k"], m["j"], m["count"]) for m in expected["group_mean"]
    ]
    assert all(
        close(a["mean"], b["mean"]) for a, b in zip(means, expected["group_mean"], strict=True)
    )


@SETTINGS
@given(st.lists(st.lists(ROW, max_size=20), min_size=3, max_size=3))
def test_merges_are_associative_and_commutative(splits: list[list[dict[str, Any]]]) -> None:
    """Exact merges (the quantile sketch's hold within its bound: tested below)."""
    cases = {
        "count": {"columns": ["v", "k"]},
        "sum": {"column": "v"},
        "mean": {"column": "v"},
        "variance": {"column": "v"},
        "min": {"column": "v"},
        "max": {"column": "v"},
        "histogram": {"column": "v", "edges": [-10.0, 0.0, 10.0]},
        "group_count": {"by": ["k"]},
        "group_mean": {"by": ["k", "j"], "column": "v"},
    }
    for name, params in cases.items():
        estimator = REGISTRY[name]
        operation = Operation(name=name, params=params)
        a, b, c = (
            part(operation, "local", [], dataset(rows, f"w{i}"), f"w{i}")
            for i, rows in enumerate(splits)
        )
        left, right = (
            estimator.merge(estimator.merge(a, b), c),
            estimator.merge(a, estimator.merge(b, c)),
        )
        swapped = estimator.merge(estimator.merge(c, a), b)
        for other in (right, swapped):
            assert same(left, other), name


def same(a: Any, b: Any) -> bool:
    """Equal, floats within 1e-9 relative; group states compared as mappings."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return close(a, b)
    return bool(a == b)


# --- the quantile sketch ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [16, 64, 256])
def test_quantile_sketch_stays_within_its_rank_error_bound(k: int) -> None:
    rng = np.random.default_rng(k)
    data = rng.lognormal(size=30_000)
    ordered = np.sort(data)
    pieces = np.split(data, [1_000, 9_000, 9_100, 21_000])
    # Each piece in batches of its own size, then merged in two different groupings.
    sketches = []
    for i, piece in enumerate(pieces):
        sketch = quantiles.empty(k)
        for batch in np.array_split(piece, 1 + i * 3):
            sketch = quantiles.update(sketch, batch)
        sketches.append(sketch)
    left = functools.reduce(quantiles.merge, sketches)
    right = functools.reduce(lambda a, b: quantiles.merge(b, a), reversed(sketches))
    n = len(data)
    bound = quantiles.error_bound(n, k) * n
    qs = [i / 100 for i in range(101)]
    for sketch in (left, right):
        assert sketch["n"] == n
        assert sum(len(level) for level in sketch["levels"]) <= k * len(sketch["levels"])
        for q, value in zip(qs, quantiles.quantiles(sketch, qs), strict=True):
            below = np.searchsorted(ordered, value, side="left")  # values < v
            at_or_below = np.searchsorted(ordered, value, side="right")  # values <= v
            assert below <= q * n + bound and at_or_below >= q * n - bound, (q, k)


def test_a_workers_sketch_leaves_with_a_small_part_of_its_values_and_keeps_its_bound() -> None:
    values = [float(v) for v in random.Random(3).sample(range(100_000), 3000)]
    data = [dataset([{"v": v, "k": "a", "j": 0} for v in values[i::3]], f"w{i}") for i in range(3)]
    operation = Operation(name="quantile", params={"column": "v", "q": 0.5, "k": 4096})
    products = [part(operation, "local", [], d, d.node) for d in data]
    for (sketch,) in products:
        held = sum(len(level) for level in sketch["levels"])
        assert sketch["k"] == quantiles.site_k(1000, 4096) == 1000 // quantiles.SHARE
        assert held <= sketch["n"] // 4, held  # nowhere near the worker's column
    median = part(operation, "aggregate", products)
    bound = quantiles.error_bound(3000, 1000 // quantiles.SHARE) * 3000
    ordered = np.sort(values)
    assert np.searchsorted(ordered, median, "left") <= 1500 + bound
    assert np.searchsorted(ordered, median, "right") >= 1500 - bound
    assert quantiles.error_bound(1_000_000, 2048) < 0.0045  # the figure the docs state


# --- masked sequential aggregation ------------------------------------------------------------


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=20))
def test_fixed_point_is_exact(values: list[float]) -> None:
    assert all(masking.unfixed(masking.fixed(v)) == v for v in values)
    exact = sum((Fraction(v) for v in values), Fraction(0))
    total = sum(masking.fixed(v) for v in values)
    if abs(exact) < 2**1023:
        assert masking.unfixed(total) == float(exact)  # the exact sum, rounded once


def test_masked_sequential_equals_unmasked_and_hides_the_running_total() -> None:
    rng = random.Random(5)
    splits = [
        [{"v": rng.uniform(-5, 50), "k": "a", "j": 0} for _ in range(n)] for n in (13, 40, 27)
    ]
    datasets = [dataset(rows, f"w{i}", min_group_size=5) for i, rows in enumerate(splits)]
    for name, params in [
        ("count", {}),
        ("sum", {"column": "v"}),
        ("mean", {"columns": ["v", "j"]}),
    ]:
        plain = federated(name, datasets, True, **params)
        masked = federated(name, datasets, True, masked=True, **params)
        assert same(masked, plain) and same(plain, federated(name, datasets, **params)), name

    # What w1 is handed: w0's product, whose number is not w0's sum, nor anything near it.
    operation = Operation(name="sum", params={"column": "v", "masked": True})
    start = part(operation, "initialize", [])
    handed = part(operation, "local", [start], datasets[0], "w0")
    true_partial = masking.fixed(math.fsum(r["v"] for r in splits[0]))
    received = int(handed["masked"][0], 16)
    assert received != true_partial and int(start["masked"][0], 16) != 0
    assert (received - int(start["masked"][0], 16)) % masking.MODULUS == true_partial
    assert set(handed) == {"vault", "masked"}  # nothing else travels


def test_masked_aggregation_refuses_what_it_cannot_protect() -> None:
    data = dataset([{"v": 1.0, "k": "a", "j": 0}] * 6, "w0")
    operation = Operation(name="count", params={"masked": True})
    # In a Parallel step the worker is handed no masked running value.
    with pytest.raises(OperationError, match="masked aggregation runs in a Sequential step"):
        part(operation, "local", [], data, "w0")
    # A running value whose masks another initiator process drew cannot be unmasked here.
    running = part(operation, "local", [part(operation, "initialize", [])], data, "w0")
    with pytest.raises(OperationError, match="restarted"):
        part(operation, "aggregate", [{**running, "vault": "another"}])


# --- minimum group size ---------------------------------------------------------------------


def test_a_worker_releases_no_aggregate_of_fewer_rows_than_its_project_allows() -> None:
    rows = [{"v": float(i), "k": "a" if i < 3 else "b", "j": 0} for i in range(10)]
    data = dataset(rows, "node-4", min_group_size=5)
    q = Query()
    assert federated("count", [data]) == 10
    assert federated("count", [data], **q[q["v"] > 100].params()) == 0  # none: releasable
    refusals = [
        ("count", q[q["v"] < 2].params()),
        ("mean", {"column": "v", **q[q["v"] > 7].params()}),
        ("group_count", {"by": "k"}),
        ("group_mean", {"by": ["k", "j"], "column": "v"}),
        ("histogram", {"column": "v", "edges": [0, 5, 8]}),
    ]
    # One message for every refusal: no group's values, no size, nothing of the data.
    message = (
        "worker node-4: project p: a group is below the site's minimum size; "
        "the worker releases no aggregate"
    )
    for name, params in refusals:
        with pytest.raises(TooFewRows) as refused:
            federated(name, [data], **params)
        assert str(refused.value) == message


# --- file datasets ----------------------------------------------------------------------------


def test_csv_and_parquet_files_read_the_same_in_batches(tmp_path: Path) -> None:
    table = pa.table(
        {
            "x": pa.array([0.5 * i for i in range(50)]),
            "n": pa.array(list(range(50))),
            "s": pa.array(["a", None, "b", "c", ""] * 10),
            "d": pa.array([date(2020, 1, 1 + i % 28) for i in range(50)]),
        }
    )
    pacsv.write_csv(table, tmp_path / "one.csv")
    pq.write_table(
        table.cast(table.schema.set(1, pa.field("n", pa.float64()))), tmp_path / "two.parquet"
    )
    spec = DatasetSpec.model_validate(
        {"paths": [tmp_path / "one.csv", tmp_path / "two.parquet"], "min_group_size": 3}
    )
    data = FileDataset("p", "w0", spec)
    assert data.describe() == {
        "columns": [
            {"name": "x", "type": "double"},
            {"name": "n", "type": "double"},  # int64 in the CSV, double in the Parquet file
            {"name": "s", "type": "string"},
            {"name": "d", "type": "date32[day]"},
        ],
        "min_group_size": 3,  # no rows: an exact count, announced only where answers are exact
        "privacy": PrivacyPolicy().describe(),
    }
    read = pa.Table.from_batches(list(data.batches(["s", "n"])))
    assert read.column_names == ["s", "n"] and read.num_rows == 100
    assert read.column("s").null_count == 20 + 10  # empty CSV cells are missing; Parquet keeps ""
    assert DatasetSpec.model_validate([tmp_path / "one.csv"]).min_group_size == 5
    typed = FileDataset("p", "w0", DatasetSpec(paths=[tmp_path / "one.csv"], types={"n": "string"}))
    assert typed.schema().field("n").type == pa.string()


def test_datasets_fail_clearly_on_files_they_cannot_use(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x,y\n1,2\n")
    (tmp_path / "b.csv").write_text("x,z\n1,2\n")
    (tmp_path / "c.csv").write_text("x,y\n1,a\n")
    (tmp_path / "d.txt").write_text("x\n1\n")
    cases = [
        ([tmp_path / "missing.csv"], "data files not found"),
        ([tmp_path / "d.txt"], "unknown data file type"),
        ([tmp_path / "a.csv", tmp_path / "b.csv"], r"b.csv has columns \['x', 'z'\]"),
        (
            [tmp_path / "a.csv", tmp_path / "c.csv"],
            "column y is int64 in a.csv but string in c.csv",
        ),
    ]
    for paths, message in cases:
        with pytest.raises(OperationError, match=f"worker w9: .*{message}|{message}"):
            FileDataset("p", "w9", DatasetSpec(paths=paths))


def test_unknown_parameters_fail_at_submission() -> None:
    for name, params, message in [
        ("mean", {}, "give column"),
        ("mean", {"column": "v", "columns": ["v"]}, "not both"),
        ("histogram", {"column": "v", "edges": [1, 0]}, "increase"),
        ("quantile", {"column": "v", "q": 1.5}, r"\[0, 1\]"),
        ("count", {"colum": "v"}, "colum"),
    ]:
        with pytest.raises(OperationError, match=message):
            operations.lookup(Operation(name=name, params=params))


def test_every_estimator_and_model_is_registered() -> None:
    expected = {
        "count",
        "sum",
        "mean",
        "variance",
        "std",
        "min",
        "max",
        "histogram",
        "quantile",
        "group_count",
        "group_mean",
        "linear_regression",
        "logistic_regression",
        "random_forest",
    }
    assert expected <= set(REGISTRY)


# --- models ---------------------------------------------------------------------------------


def test_forest_leaves_each_hold_at_least_the_minimum_group_of_training_rows() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(400, 2))
    table = pa.table({"f1": x[:, 0], "f2": x[:, 1], "label": (x.sum(axis=1) > 0).astype(int)})
    data = TableDataset(table, node="w0", batch_rows=64)
    data.min_group_size = 7
    data.privacy = PrivacyPolicy(exact=True, labels={"label": [0, 1]})
    params = {"features": ["f1", "f2"], "label": "label", "trees": 4}
    operation = Operation(name="random_forest", params=params)
    model = part(operation, "local", [], data, "w0")["model"]
    train = np.concatenate(
        [
            xs[~test]
            for xs, _, test in models.design(
                data, forest.ForestParams.model_validate(params), seed=11
            )
        ]
    )
    assert len(model["trees"]) == 4
    for tree in model["trees"]:
        sizes = np.bincount(forest.leaves(tree, train))
        assert sizes[sizes > 0].min() >= 7


def test_the_split_is_seeded_by_row_and_keeps_its_fraction() -> None:
    rows = np.arange(100_000)
    test = models.is_test(rows, 99, 0.2)
    assert abs(test.mean() - 0.2) < 0.005
    assert (models.is_test(rows[500:900], 99, 0.2) == test[500:900]).all()  # batch-independent
    assert (models.is_test(rows, 100, 0.2) != test).any()
