"""Federated analytics end to end: a scheduler and three workers in this process, on a real
mosquitto, each worker holding its own share (CSV or Parquet, uneven sizes) of a data set
generated here with a fixed seed. Every federated result is compared with the same
statistic computed directly on the concatenated shares.

The cluster is shared by the tests of this module and of test_models.py (which imports
the fixture): starting it once keeps the suite fast; each test submits its own artifacts.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from helpers import wait_for

from flotta_mqtt import (
    Artifact,
    ArtifactFailed,
    ArtifactState,
    Client,
    Collect,
    Finalize,
    Operation,
    Parallel,
    Query,
    Sequential,
)
from flotta_mqtt.analytics import PrivacyPolicy, masking, quantiles
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

WORKERS = ("w0", "w1", "w2")  # the scheduler orders workers by name: Sequential's order
SIZES = (523, 911, 1377)  # uneven, so a result off by one worker's share cannot pass
SITES = ["north", "south", "east", "west"]
TIMEOUT = 30.0
# These tests check that federated results equal pooled ones: the sites answer exactly.
# (test_privacy_attacks.py plays the default policy, differential privacy, against attacks.)
EXACT = {"exact": True, "release_extremes": True, "labels": {"label": [0, 1]}}


def stats_table(rng: np.random.Generator, n: int) -> pa.Table:
    days = np.datetime64("2019-01-01") + rng.integers(0, 3 * 365, n)
    return pa.table(
        {
            "x": rng.random(n),
            "y": rng.normal(10.0, 3.0, n),
            "n": rng.integers(0, 100, n),
            "site": rng.choice(SITES, n),
            "sex": rng.choice(["f", "m"], n),
            "day": pa.array(days.astype("datetime64[D]"), pa.date32()),
        }
    )


def model_table(rng: np.random.Generator, n: int) -> pa.Table:
    """Features f1, f2; a 0/1 label from a logistic model; a linear target."""
    f1, f2 = rng.normal(0, 1, n), rng.normal(1, 2, n)
    chance = 1 / (1 + np.exp(-(0.5 + 2.0 * f1 - 1.5 * f2)))
    return pa.table(
        {
            "f1": f1,
            "f2": f2,
            "label": (rng.random(n) < chance).astype(np.int64),
            "target": 3.0 + 2.0 * f1 - 0.5 * f2 + rng.normal(0, 0.5, n),
        }
    )


@dataclass
class Nodes:
    """The running cluster, the workers' files, and what each worker holds, as read back."""

    client: Client
    scheduler: SchedulerNode
    store: ResourceStore
    folder: Path
    shares: dict[str, dict[str, pa.Table]] = field(default_factory=dict)  # project → worker

    def pooled(self, project: str) -> pa.Table:
        return pa.concat_tables(self.shares[project][w] for w in sorted(self.shares[project]))

    def product(self, artifact_id: str, job_id: int) -> Any:
        """A job's product as the store holds it (its first attempt)."""
        return json.loads(self.store.get_bytes(self.store.product_url(artifact_id, str(job_id), 1)))


def write(table: pa.Table, path: Path) -> pa.Table:
    """Write a share and return it as read back (what the worker reads, independently)."""
    if path.suffix == ".parquet":
        pq.write_table(table, path)
        return pq.read_table(path)
    pacsv.write_csv(table, path)
    return pacsv.read_csv(path)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    folder = tmp_path_factory.mktemp("analytics")
    rng = np.random.default_rng(20240607)
    storage = StorageSettings(url=(folder / "store").as_uri())
    shares: dict[str, dict[str, pa.Table]] = defaultdict(dict)
    datasets: dict[str, dict[str, Any]] = defaultdict(dict)
    for i, (name, size) in enumerate(zip(WORKERS, SIZES, strict=True)):
        suffix = ".parquet" if name == "w1" else ".csv"
        stats = write(stats_table(rng, size), folder / f"stats-{name}{suffix}")
        shares["stats"][name] = stats
        datasets[name]["stats"] = {"paths": [folder / f"stats-{name}{suffix}"], "privacy": EXACT}
        # A project where one worker has a site of only three rows.
        rare = stats.set_column(3, "site", pa.array(["rare"] * 3 + ["common"] * (size - 3)))
        shares["rare"][name] = write(rare, folder / f"rare-{name}.csv")
        datasets[name]["rare"] = {
            "paths": [folder / f"rare-{name}.csv"],
            "min_group_size": 4,
            "privacy": EXACT,
        }
        models = write(model_table(rng, 700 + 400 * i), folder / f"models-{name}{suffix}")
        shares["models"][name] = models
        datasets[name]["models"] = {"paths": [folder / f"models-{name}{suffix}"], "privacy": EXACT}
        if name != "w2":  # two workers only: the merged forest holds 2 x its trees
            shares["pair"][name] = models
            datasets[name]["pair"] = {
                "paths": [folder / f"models-{name}{suffix}"],
                "privacy": EXACT,
            }
    with LocalBroker() as broker:
        settings = BrokerSettings(url=broker.url)
        running: list[Any] = []
        try:
            scheduler = SchedulerNode(
                SchedulerConfig(broker=settings, storage=storage, database=folder / "s.db")
            ).start(wait=TIMEOUT)
            running.append(scheduler)
            for name in WORKERS:
                config = WorkerConfig(
                    name=name, broker=settings, storage=storage, datasets=datasets[name]
                )
                running.append(WorkerAgent(config).start(wait=TIMEOUT))
            client = Client(settings, storage=storage, resend_interval=1.0)
            running.append(client)
            expected = {*WORKERS, scheduler.config.initiator}
            wait_for(
                lambda: expected <= {p.node for p in client.workers() if p.online},
                timeout=TIMEOUT,
                message="the workers never came online",
            )
            store = ResourceStore(storage.url)
            yield Nodes(client, scheduler, store, folder, dict(shares))
        finally:
            for node in reversed(running):
                node.close() if isinstance(node, Client) else node.stop()


def estimate(project: str, name: str, **params: Any) -> Artifact:
    """The seed's shape: `name` on every worker → Collect → merged on the initiator."""
    operation = Operation(name=name, params=params)
    return Artifact(project=project, steps=[Parallel(operation, Collect()), Finalize(operation)])


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


# --- the schema in presence ---------------------------------------------------------------------


def test_each_worker_announces_its_datasets_schema_and_rows_never_data(nodes: Nodes) -> None:
    presence = {p.node: p for p in nodes.client.workers()}
    for name, size in zip(WORKERS, SIZES, strict=True):
        stats = presence[name].details["stats"]
        assert stats == {
            "columns": [
                {"name": "x", "type": "double"},
                {"name": "y", "type": "double"},
                {"name": "n", "type": "int64"},
                {"name": "site", "type": "string"},
                {"name": "sex", "type": "string"},
                {"name": "day", "type": "date32[day]"},
            ],
            "rows": size,  # announced only because the site answers exactly
            "min_group_size": 5,
            "privacy": PrivacyPolicy.model_validate(EXACT).describe(),
        }
        assert presence[name].details["rare"]["min_group_size"] == 4


# --- every estimator equals the pooled statistic --------------------------------------------------


def test_every_estimator_over_three_workers_equals_the_pooled_statistic(nodes: Nodes) -> None:
    pooled = nodes.pooled("stats").to_pydict()
    rows = [dict(zip(pooled, values, strict=True)) for values in zip(*pooled.values(), strict=True)]
    q = Query()
    where = q[(q["x"] > 0.25) & ~q["site"].isin(["west"]) & (q["day"] >= date(2020, 1, 1))]
    kept = [
        r for r in rows if r["x"] > 0.25 and r["site"] != "west" and r["day"] >= date(2020, 1, 1)
    ]
    ys = [r["y"] for r in kept]
    edges = [0.0, 5.0, 10.0, 12.5, 15.0, 20.0]
    artifacts = {
        "count": estimate("stats", "count", **where.params()),
        "count_sex": estimate("stats", "count", **q[q["sex"] == "f"].params()),
        "sum": estimate("stats", "sum", column="y", **where.params()),
        "mean": estimate("stats", "mean", **where[["y", "n"]].params()),
        "variance": estimate("stats", "variance", column="y", **where.params()),
        "std": estimate("stats", "std", column="y", ddof=0, **where.params()),
        "min": estimate("stats", "min", column="y", **where.params()),
        "max": estimate("stats", "max", columns=["y", "n"]),
        "histogram": estimate("stats", "histogram", column="y", edges=edges, **where.params()),
        "group_count": estimate("stats", "group_count", by=["site", "sex"]),
        "group_mean": estimate("stats", "group_mean", by="site", column="y", **where.params()),
    }
    handles = {name: nodes.client.submit(a) for name, a in artifacts.items()}
    result = {name: h.result(timeout=TIMEOUT) for name, h in handles.items()}

    # Exact: counts, group counts, min / max, histograms.
    assert result["count"] == len(kept) > 100
    assert result["count_sex"] == sum(r["sex"] == "f" for r in rows)
    assert result["min"] == min(ys)
    assert result["max"] == {"y": max(pooled["y"]), "n": max(pooled["n"])}
    counts, _ = np.histogram(ys, bins=edges)
    assert result["histogram"] == {
        "edges": edges,
        "counts": counts.tolist(),
        "below": sum(y < edges[0] for y in ys),
        "above": sum(y > edges[-1] for y in ys),
    }
    groups = Counter((r["site"], r["sex"]) for r in rows)
    assert result["group_count"] == [
        {"site": site, "sex": sex, "count": n} for (site, sex), n in sorted(groups.items())
    ]
    # Within 1e-9 relative: sums, means, variances, group means.
    assert close(result["sum"], math.fsum(ys))
    assert close(result["mean"]["y"], statistics.fmean(ys))
    assert close(result["mean"]["n"], statistics.fmean(r["n"] for r in kept))
    assert close(result["variance"], statistics.variance(ys))
    assert close(result["std"], statistics.pstdev(ys))
    by_site: dict[str, list[float]] = defaultdict(list)
    for r in kept:
        by_site[r["site"]].append(r["y"])
    assert [g["site"] for g in result["group_mean"]] == sorted(by_site)
    for group in result["group_mean"]:
        assert group["count"] == len(by_site[group["site"]])
        assert close(group["mean"], statistics.fmean(by_site[group["site"]]))


def test_quantiles_are_within_the_stated_bound_and_results_download_as_json(
    nodes: Nodes, tmp_path: Path
) -> None:
    ys = np.sort(nodes.pooled("stats").column("y").to_numpy())
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    handle = nodes.client.submit(estimate("stats", "quantile", column="y", q=qs, k=256))
    found = handle.result(timeout=TIMEOUT)
    # Each worker's sketch leaves shrunk to k = n / 16 (so it cannot carry its column):
    # the merged sketch's bound is that of the smallest.
    k = min(quantiles.site_k(size, 256) for size in SIZES)
    bound = quantiles.error_bound(len(ys), k) * len(ys)
    for q, value in zip(qs, found, strict=True):
        assert np.searchsorted(ys, value, "left") <= q * len(ys) + bound
        assert np.searchsorted(ys, value, "right") >= q * len(ys) - bound
    path = handle.download(tmp_path / "quantiles.json")
    assert json.loads(path.read_text()) == found


# --- masked sequential aggregation ----------------------------------------------------------------


def test_masked_sequential_count_sum_mean_equal_unmasked_and_hide_partial_sums(
    nodes: Nodes,
) -> None:
    q = Query()
    over = q[q["x"] > 0.5]
    cases = {
        "count": over.params(),
        "sum": {"column": "y", **over.params()},
        "mean": {"columns": ["y", "n"], **over.params()},
    }
    for name, params in cases.items():
        plain = nodes.client.submit(estimate("stats", name, **params))
        masked = nodes.client.submit(
            Artifact(
                project="stats",
                steps=[Sequential(Operation(name=name, params={**params, "masked": True}))],
            )
        )
        expected, got = plain.result(timeout=TIMEOUT), masked.result(timeout=TIMEOUT)
        if name == "mean":
            assert got.keys() == expected.keys()
            assert all(close(got[c], expected[c]) for c in got)
        else:
            assert got == expected if name == "count" else close(got, expected)
        if name == "sum":
            # Jobs: 0 initialize (initiator) → 1 w0 → 2 w1 → 3 w2 → 4 aggregate.
            start = nodes.product(masked.artifact_id, 0)  # what w0 is handed
            handed = nodes.product(masked.artifact_id, 1)  # what w1 is handed
            assert set(handed) == {"vault", "masked"}  # nothing else travels
            share = nodes.shares["stats"]["w0"].to_pydict()
            w0_sum = math.fsum(y for x, y in zip(share["x"], share["y"], strict=True) if x > 0.5)
            received, mask = int(handed["masked"][0], 16), int(start["masked"][0], 16)
            assert received != masking.fixed(w0_sum) and mask != 0
            # Only with the initiator's mask does w1's number turn into w0's sum.
            assert close(masking.unfixed((received - mask) % masking.MODULUS), w0_sum)


# --- errors name the worker and the column --------------------------------------------------------


def test_unknown_column_type_mismatch_and_small_groups_fail_the_artifact_clearly(
    nodes: Nodes,
) -> None:
    q = Query()
    cases = [
        (
            estimate("stats", "mean", column="weight"),
            "UnknownColumn",
            r"worker w\d: project stats has no column weight",
        ),
        (
            estimate("stats", "count", **q[q["site"] > 3].params()),
            "ColumnTypeError",
            r"worker w\d: column site of project stats is string; "
            "the filter compares it with the number 3",
        ),
        (
            estimate("stats", "mean", column="sex"),
            "ColumnTypeError",
            r"worker w\d: column sex of project stats is string, not numbers",
        ),
        (
            estimate("rare", "group_count", by="site"),
            "TooFewRows",
            r"worker w\d: project rare: a group is below the site's minimum size; "
            "the worker releases no aggregate",
        ),
    ]
    handles = [(nodes.client.submit(a), kind, message) for a, kind, message in cases]
    for handle, kind, message in handles:
        with pytest.raises(ArtifactFailed, match=message) as failure:
            handle.result(timeout=TIMEOUT)
        assert failure.value.remote.type == kind
        assert failure.value.status.state is ArtifactState.FAILED
    # The same group is releasable where the project allows it.
    fine = nodes.client.submit(estimate("rare", "group_count", by="sex"))
    assert sum(g["count"] for g in fine.result(timeout=TIMEOUT)) == sum(SIZES)
