"""`@distributed` calls through the whole engine: the seed's example at 2,000 calls.

Processes: mosquitto; a scheduler; 4 worker processes (WorkerAgent, `executors:
[python]`, `allow_code: true`, `max_jobs` = threads); this process as the caller. The
function sleeps 10 ms and adds two numbers, `threads=4`, so the ideal is 2,000 x 10 ms
/ 16 slots = 1.25 s and the serial time 20 s.

Two runs of 2,000 calls each: *cold* starts right after the workers are up (their
call-process zygotes warm): it includes packing and uploading the workspace, each
worker fetching and unpacking it and forking its call processes; *warm* repeats the
calls with all of that in place. The wall time is from the first call to the last value
gathered, in order, and checked.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench._report import machine_load, print_table

CALLS = 2_000
WORKERS = 4
THREADS = 4
SLEEP = 0.01
SPAWN = mp.get_context("spawn")  # children start clean: no inherited paho threads

FUNCTION = f"""
from time import sleep

from flotta_mqtt import distributed


@distributed(platform="*", threads={THREADS})
def sleep_sum(a: int, b: int) -> int:
    sleep({SLEEP})
    return a + b
"""


def _scheduler_main(url: str, store: str, database: str, ready: Any, stop: Any) -> None:
    from flotta_mqtt.roles.config import BrokerSettings, StorageSettings
    from flotta_mqtt.roles.scheduler.service import Scheduler, SchedulerConfig

    logging.basicConfig(level=logging.WARNING)
    config = SchedulerConfig(
        broker=BrokerSettings(url=url),
        storage=StorageSettings(url=store),
        database=Path(database),
        worker_grace=0.5,
    )
    scheduler = Scheduler(config).start()
    ready.set()
    stop.wait()
    scheduler.stop()


def _worker_main(name: str, url: str, store: str, ready: Any, stop: Any) -> None:
    from flotta_mqtt.roles.config import BrokerSettings, StorageSettings
    from flotta_mqtt.roles.executors.python import PythonExecutor
    from flotta_mqtt.roles.worker.agent import WorkerAgent, WorkerConfig

    logging.basicConfig(level=logging.WARNING)
    config = WorkerConfig(
        name=name,
        broker=BrokerSettings(url=url),
        storage=StorageSettings(url=store),
        executors=["python"],
        allow_code=True,
        max_jobs=THREADS,
    )
    agent = WorkerAgent(config).start()
    executor = agent.tasks.executors["python"]
    assert isinstance(executor, PythonExecutor)
    executor.warm.wait(60)  # a worker's start-up, not the calls', is what the zygote costs
    ready.set()
    stop.wait()
    agent.stop()


def _round(calls: int) -> float:
    from bench_functions_ws import sleep_sum  # type: ignore[import-not-found]

    import flotta_mqtt

    start = time.perf_counter()
    handles = [sleep_sum(x, x + 1) for x in range(calls)]
    values = flotta_mqtt.gather(handles, timeout=300)
    wall = time.perf_counter() - start
    if values != [2 * x + 1 for x in range(calls)]:
        raise AssertionError("the calls returned wrong values")
    return wall


def run(calls: int = CALLS) -> list[dict[str, float]]:
    """Start the nodes, time a cold and a warm round of `calls` calls, print the table."""
    import sys

    import flotta_mqtt
    from flotta_mqtt.mosquitto import LocalBroker
    from flotta_mqtt.roles.functions import shutdown

    with tempfile.TemporaryDirectory(prefix="flotta-bench-fn-") as tmp, LocalBroker() as broker:
        scratch = Path(tmp)
        workspace = scratch / "workspace"
        workspace.mkdir()
        (workspace / "bench_functions_ws.py").write_text(textwrap.dedent(FUNCTION))
        store = (scratch / "store").as_uri()
        stop = SPAWN.Event()
        readies = [SPAWN.Event() for _ in range(WORKERS + 1)]
        processes = [
            SPAWN.Process(
                target=_scheduler_main,
                args=(broker.url, store, str(scratch / "s.db"), readies[0], stop),
                name="scheduler",
            ),
            *(
                SPAWN.Process(
                    target=_worker_main,
                    args=(f"w{i}", broker.url, store, readies[i + 1], stop),
                    name=f"w{i}",
                )
                for i in range(WORKERS)
            ),
        ]
        for process in processes:
            process.start()
        sys.path.insert(0, str(workspace))
        try:
            for ready in readies:
                if not ready.wait(120):
                    raise RuntimeError("a node did not start")
            flotta_mqtt.configure(broker=broker.url, storage=store, workspace=workspace)
            rounds = [{"cold": _round(calls)}, {"warm": _round(calls)}]
        finally:
            shutdown()
            sys.path.remove(str(workspace))
            stop.set()
            for process in processes:
                process.join(20)
                if process.is_alive():
                    process.kill()
    serial = calls * SLEEP
    rows = []
    figures = []
    for entry in rounds:
        ((label, wall),) = entry.items()
        rows.append(
            [
                label,
                f"{calls:,}",
                f"{wall:.2f}",
                f"{serial:.1f}",
                f"{wall / serial:.2f}",
                f"{calls / wall:,.0f}",
            ]
        )
        figures.append({"wall": wall, "serial": serial, "ratio": wall / serial})
    print_table(
        f"@distributed: {calls:,} calls of sleep({SLEEP}), {WORKERS} workers, threads={THREADS}",
        ["round", "calls", "wall s", "serial s", "wall / serial", "calls/s"],
        rows,
        note=(
            f"target: wall / serial < 0.5; ideal {calls * SLEEP / (WORKERS * THREADS):.2f} s "
            f"({machine_load()})"
        ),
    )
    return figures


if __name__ == "__main__":
    run()
