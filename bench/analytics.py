"""Federated analytics on a large CSV: count and mean with a filter, on one worker.

A CSV of about `--size-mb` MB (columns x, y, site) is generated under /tmp — 64 MB of
random rows written as many times as needed, which is fast and which the reader cannot
tell — and removed afterwards. On a fresh LocalBroker, a scheduler and one worker run in
this process; the figures are wall times from submit to result, as a workbench sees them:

- `wc -l`: the time the coreutils line counter takes to read the same file, in the same
  run (the page cache is warm for both: the file was just written);
- worker start: the worker counts a CSV's rows once when it starts (presence reports it);
- count where x > 0.5, and mean of y where x > 0.5: each reads the file once, only the
  columns it needs, in batches, with pyarrow's streaming CSV reader.
"""

from __future__ import annotations

import math
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._report import console, machine_load, print_table
from flotta_mqtt import Artifact, Client, Collect, Finalize, Operation, Parallel, Query
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

BLOCK_MB = 64
SITES = np.array(["north", "south", "east", "west"])


def write_csv(path: Path, size_mb: int) -> tuple[int, float, int]:
    """The file, and the rows with x > 0.5: their count and their sum of y (expected)."""
    rng = np.random.default_rng(7)
    rows = BLOCK_MB * (1 << 20) // 26  # about 26 bytes a row
    x, y = rng.random(rows).round(6), rng.normal(10.0, 3.0, rows).round(6)
    text = (
        "\n".join(
            f"{a:.6f},{b:.6f},{s}"
            for a, b, s in zip(x, y, SITES[rng.integers(0, 4, rows)], strict=True)
        ).encode()
        + b"\n"
    )
    copies = max(1, round(size_mb / (len(text) / (1 << 20))))
    with path.open("wb") as f:
        f.write(b"x,y,site\n")
        for _ in range(copies):
            f.write(text)
    over = x > 0.5
    return int(over.sum()) * copies, float(y[over].sum()) * copies, rows * copies


def timed(client: Client, artifact: Artifact) -> tuple[float, Any]:
    start = time.perf_counter()
    result = client.submit(artifact).result(timeout=3600)
    return time.perf_counter() - start, result


def estimate(name: str, **params: object) -> Artifact:
    operation = Operation(name=name, params=params)
    return Artifact(project="big", steps=[Parallel(operation, Collect()), Finalize(operation)])


def run(size_mb: int = 1024) -> None:
    with tempfile.TemporaryDirectory(prefix="flotta-bench-", dir="/tmp") as tmp:
        folder = Path(tmp)
        path = folder / "big.csv"
        console.print(f"writing a {size_mb} MB CSV to {path} …")
        expected_count, expected_sum, rows = write_csv(path, size_mb)
        megabytes = path.stat().st_size / 1e6

        start = time.perf_counter()
        subprocess.run(["wc", "-l", str(path)], stdout=subprocess.DEVNULL, check=True)
        wc = time.perf_counter() - start

        storage = StorageSettings(url=(folder / "store").as_uri())
        with LocalBroker() as broker:
            settings = BrokerSettings(url=broker.url)
            scheduler = SchedulerNode(
                SchedulerConfig(broker=settings, storage=storage, database=folder / "s.db")
            ).start()
            start = time.perf_counter()
            worker = WorkerAgent(
                WorkerConfig(
                    name="w0",
                    broker=settings,
                    storage=storage,
                    datasets={"big": {"paths": [path], "privacy": {"exact": True}}},
                )
            ).start()
            started = time.perf_counter() - start
            try:
                with Client(settings, storage=storage) as client:
                    while not any(p.node == "w0" and p.online for p in client.workers()):
                        time.sleep(0.05)
                    q = Query()
                    over = q[q["x"] > 0.5].params()
                    count_time, count = timed(client, estimate("count", **over))
                    mean_time, mean = timed(client, estimate("mean", column="y", **over))
            finally:
                worker.stop()
                scheduler.stop()

    matches = count == expected_count and math.isclose(
        mean, expected_sum / expected_count, rel_tol=1e-9
    )

    def row(what: str, seconds: float) -> list[str]:
        return [what, f"{seconds:.2f}", f"{megabytes / seconds:,.0f}"]

    print_table(
        f"Count and mean with a filter on one worker: {megabytes:,.0f} MB, {rows:,} rows",
        ["", "seconds", "MB/s"],
        [
            row("wc -l (same file, same run)", wc),
            row("worker start (counts the CSV's rows)", started),
            row("count where x > 0.5", count_time),
            row("mean of y where x > 0.5", mean_time),
        ],
        note=f"{machine_load()}; count and mean "
        + ("match" if matches else "[red]DO NOT MATCH[/red]")
        + " the generator's own",
    )
