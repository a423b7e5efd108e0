"""Declared categories end to end: a scheduler and two workers on a real mosquitto, one
reading a CSV, the other a SQLite table, both declaring the categories of `site` while
their data also holds values outside them. The workbench sees the categories where it
sees the schema; a noised group count lists every declared site, present or not, and
no other; a filter on a site not declared fails the artifact naming the declared ones.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_for

from flotta_mqtt import Artifact, ArtifactFailed, Client, Collect, Finalize, Operation, Parallel
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

TIMEOUT = 30.0
SITES = ["north", "south", "rare"]  # "rare" has no row anywhere
ROWS = [("north", 1.0)] * 30 + [("south", 2.0)] * 20 + [("nrth", 3.0)] * 7 + [(None, 4.0)] * 2


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    folder = tmp_path_factory.mktemp("categories")
    (folder / "w0.csv").write_text(
        "site,y\n" + "".join(f"{s or ''},{y}\n" for s, y in ROWS), encoding="utf-8"
    )
    with sqlite3.connect(folder / "w1.db") as con:
        con.execute("CREATE TABLE t (site TEXT, y REAL)")
        con.executemany("INSERT INTO t VALUES (?, ?)", ROWS)
    con.close()
    sources: dict[str, dict[str, Any]] = {
        "w0": {"paths": [folder / "w0.csv"]},
        "w1": {"sql": {"url": f"sqlite:///{folder / 'w1.db'}", "table": "t"}},
    }
    storage = StorageSettings(url=(folder / "store").as_uri())
    with LocalBroker() as broker:
        settings = BrokerSettings(url=broker.url)
        running: list[Any] = []
        try:
            scheduler = SchedulerNode(
                SchedulerConfig(broker=settings, storage=storage, database=folder / "s.db")
            ).start(wait=TIMEOUT)
            running.append(scheduler)
            for name, source in sources.items():
                spec = {**source, "categories": {"site": SITES}, "privacy": {"epsilon": 10.0}}
                config = WorkerConfig(
                    name=name,
                    broker=settings,
                    storage=storage,
                    datasets={"p": spec},
                    state_dir=folder / "state" / name,
                )
                running.append(WorkerAgent(config).start(wait=TIMEOUT))
            found = Client(settings, storage=storage, resend_interval=1.0)
            running.append(found)
            expected = {*sources, scheduler.config.initiator}
            wait_for(
                lambda: expected <= {p.node for p in found.workers() if p.online},
                timeout=TIMEOUT,
                message="the workers never came online",
            )
            yield found
        finally:
            for node in reversed(running):
                node.close() if isinstance(node, Client) else node.stop()


def estimate(name: str, **params: Any) -> Artifact:
    operation = Operation(name=name, params=params)
    return Artifact(project="p", steps=[Parallel(operation, Collect()), Finalize(operation)])


def test_the_workbench_sees_each_workers_declared_categories(client: Client) -> None:
    presence = {p.node: p for p in client.workers()}
    for name in ("w0", "w1"):
        assert presence[name].details["p"]["categories"] == {"site": SITES}


def test_a_noised_group_count_lists_every_declared_site_and_no_other(client: Client) -> None:
    result = client.submit(estimate("group_count", by=["site"], epsilon=1.0)).result(
        timeout=TIMEOUT
    )
    assert result["mechanism"] == "laplace" and result["delta"] == 0.0
    groups = {row["site"]: row["count"] for row in result["value"]}
    assert list(groups) == [None, "north", "rare", "south"]  # "nrth" is missing: None
    assert abs(groups["north"] - 60) < 20 and abs(groups["south"] - 40) < 20


def test_a_filter_on_a_site_not_declared_fails_the_artifact_naming_the_declared(
    client: Client,
) -> None:
    where = {"kind": "compare", "column": "site", "op": "==", "value": "nrth"}
    handle = client.submit(estimate("count", where=where, epsilon=1.0))
    with pytest.raises(ArtifactFailed, match="which takes only its declared categories: 'north'"):
        handle.result(timeout=TIMEOUT)
