"""What the examples share: their options, and `--local` — a mosquitto, a scheduler and
three workers in this process.

With `--local` each worker gets its own share of a generated table (uneven sizes, a fixed
seed; one Parquet file and two CSVs) in a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from flotta_mqtt import Client, StorageSettings
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

WORKERS = ("node-1", "node-2", "node-3")
SIZES = (1200, 2100, 3300)
EXACT = {"exact": True, "release_extremes": True, "labels": {"label": [0, 1]}}


@contextlib.contextmanager
def local_cluster(
    project: str, make: Callable[[np.random.Generator, int], pa.Table]
) -> Iterator[tuple[str, str]]:
    """Start the nodes; yield (broker URL, storage URL) once every worker is online."""
    rng = np.random.default_rng(2024)
    with tempfile.TemporaryDirectory(prefix="flotta-example-") as tmp, LocalBroker() as broker:
        folder = Path(tmp)
        storage = StorageSettings(url=(folder / "store").as_uri())
        settings = BrokerSettings(url=broker.url)
        nodes: list[SchedulerNode | WorkerAgent] = []
        try:
            config = SchedulerConfig(broker=settings, storage=storage, database=folder / "s.db")
            nodes.append(SchedulerNode(config).start())
            for name, size in zip(WORKERS, SIZES, strict=True):
                table = make(rng, size)
                if name == "node-2":
                    path = folder / f"{name}.parquet"
                    pq.write_table(table, path)
                else:
                    path = folder / f"{name}.csv"
                    pacsv.write_csv(table, path)
                worker = WorkerConfig(
                    name=name,
                    broker=settings,
                    storage=storage,
                    # The examples show exact federated results: these sites allow them.
                    datasets={project: {"paths": [path], "privacy": EXACT}},
                )
                nodes.append(WorkerAgent(worker).start())
            with Client(settings, storage=storage) as client:
                while {w.node for w in client.workers() if w.online} < set(WORKERS):
                    time.sleep(0.05)
            yield broker.url, storage.url
        finally:
            for node in reversed(nodes):
                node.stop()


def options(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--storage", default="file://./flotta-store")
    parser.add_argument("--local", action="store_true", help="start local nodes in-process")
    return parser.parse_args()


@contextlib.contextmanager
def workbench(
    args: argparse.Namespace, project: str, make: Callable[[np.random.Generator, int], pa.Table]
) -> Iterator[Client]:
    """A Client of the nodes at --broker, or of local ones holding `make`'s data."""
    if not args.local:
        with Client(args.broker, storage=StorageSettings(url=args.storage)) as client:
            yield client
        return
    with (
        local_cluster(project, make) as (broker, storage),
        Client(broker, storage=StorageSettings(url=storage)) as client,
    ):
        yield client
