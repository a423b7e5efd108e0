"""A worker's columnar copy end to end, on a real mosquitto: the worker answers from its
copy (kept in its state folder), and a data file swapped for another by a rename, with
its size and modification time put back, is answered from the new rows at the next
artifact, never from the stale copy; the copy is then made again."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from helpers import wait_for

from flotta_mqtt import Artifact, Client, Collect, Finalize, Operation, Parallel, Query
from flotta_mqtt.analytics import FileDataset, copies
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


def count_over(client: Client, project: str) -> float:
    q = Query()
    operation = Operation(name="count", params=q[q["x"] > 0.5].params())
    steps = [Parallel(operation, Collect()), Finalize(operation)]
    artifact = Artifact(project=project, steps=steps)
    return float(client.submit(artifact).result(timeout=TIMEOUT))


def test_a_swapped_file_is_never_answered_from_the_stale_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(copies, "SETTLE_SECONDS", 0.0)
    data = tmp_path / "data.csv"
    pacsv.write_csv(pa.table({"x": [0.6] * 7 + [0.1] * 3}), data)
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    with LocalBroker() as broker:
        settings = BrokerSettings(url=broker.url)
        scheduler = SchedulerNode(
            SchedulerConfig(broker=settings, storage=storage, database=tmp_path / "s.db")
        ).start(wait=TIMEOUT)
        worker = WorkerAgent(
            WorkerConfig(
                name="w0",
                broker=settings,
                storage=storage,
                state_dir=tmp_path / "state",
                datasets={"p": {"paths": [data], "privacy": {"exact": True}}},
            )
        ).start(wait=TIMEOUT)
        try:
            dataset = worker.datasets["p"]
            assert isinstance(dataset, FileDataset) and dataset.copy is not None
            assert dataset.copy.wait(TIMEOUT)
            (made,) = (tmp_path / "state" / "copies" / "p").glob(f"*{copies.SUFFIX}")
            with Client(settings, storage=storage) as client:
                wait_for(
                    lambda: any(p.node == "w0" and p.online for p in client.workers()),
                    timeout=TIMEOUT,
                    message="the worker never came online",
                )
                assert count_over(client, "p") == 7
                swapped = tmp_path / "swapped.csv"
                pacsv.write_csv(pa.table({"x": [0.1] * 4 + [0.9] * 6}), swapped)
                was = data.stat()
                os.utime(swapped, ns=(was.st_atime_ns, was.st_mtime_ns))
                assert swapped.stat().st_size == was.st_size
                swapped.replace(data)
                assert count_over(client, "p") == 6
                assert dataset.copy.wait(TIMEOUT)  # made again, of the new file
                wait_for(lambda: not made.exists(), TIMEOUT, "the stale copy was kept")
                assert count_over(client, "p") == 6
        finally:
            worker.stop()
            scheduler.stop()
