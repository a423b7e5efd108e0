"""`@distributed` calls through the whole engine: the seed's example at 2,000 calls.

Processes: mosquitto; a scheduler; 4 worker processes (WorkerAgent, `executors:
[python]`, `allow_code: true`, `max_jobs` = threads); this process as the caller. The
function sleeps 10 ms and adds two numbers, `threads=4`, so the ideal is 2,000 x 10 ms
/ 16 slots = 1.25 s and the serial time 20 s.

Each round also reports the CPU time every role used per call (Linux /proc), and how many
of the machine's cores other processes kept busy meanwhile: on a shared 2-core machine
the wall time says as much about the neighbours as about the calls.

Two runs of 2,000 calls each: *cold* starts right after the workers are up (their
call-process zygotes warm): it includes packing and uploading the workspace, each
worker fetching and unpacking it and forking its call processes; *warm* repeats the
calls with all of that in place. The wall time is from the first call to the last value
gathered, in order, and checked.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
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
    from flotta_mqtt.nodes import SchedulerNode
    from flotta_mqtt.scheduler.config import SchedulerConfig
    from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

    logging.basicConfig(level=logging.WARNING)
    config = SchedulerConfig(
        broker=BrokerSettings(url=url),
        storage=StorageSettings(url=store),
        database=Path(database),
        worker_grace=0.5,
    )
    scheduler = SchedulerNode(config).start()
    ready.set()
    stop.wait()
    scheduler.stop()


def _worker_main(name: str, url: str, store: str, ready: Any, stop: Any) -> None:
    from flotta_mqtt.functions.executor import PythonExecutor
    from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
    from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

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


def _round(calls: int, roles: dict[str, list[int]]) -> dict[str, float]:
    """Wall time of one round, and CPU seconds per role (and the machine's) during it."""
    from bench_functions_ws import sleep_sum  # type: ignore[import-not-found]

    import flotta_mqtt

    before = _cpu(roles)
    start = time.perf_counter()
    handles = [sleep_sum(x, x + 1) for x in range(calls)]
    values = flotta_mqtt.gather(handles, timeout=300)
    wall = time.perf_counter() - start
    after = _cpu(roles)
    if values != [2 * x + 1 for x in range(calls)]:
        raise AssertionError("the calls returned wrong values")
    return {"wall": wall} | {role: after[role] - before[role] for role in after}


def _cpu(roles: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each role's processes and their descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))

    def tree(pid: int) -> list[int]:
        return [pid, *(p for child in children.get(pid, []) for p in tree(child))]

    used = {
        # The caller's own process only: the nodes and the broker are its children here.
        role: sum(
            _cpu_seconds(p) for pid in pids for p in ([pid] if role == "caller" else tree(pid))
        )
        for role, pids in roles.items()
    }
    return used | {"machine": _machine_cpu_seconds()}


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_cpu_seconds() -> float:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run(calls: int = CALLS) -> list[dict[str, float]]:
    """Start the nodes, time a cold and a warm round of `calls` calls, print the table."""
    import sys

    import flotta_mqtt
    from flotta_mqtt.broker import LocalBroker
    from flotta_mqtt.functions import shutdown

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
            roles = {
                "caller": [os.getpid()],
                "scheduler": [processes[0].pid or 0],
                # Each worker with its zygote and call processes (its descendants).
                "workers": [p.pid or 0 for p in processes[1:]],
                "mosquitto": [broker.process.pid if broker.process else 0],
            }
            rounds = [("cold", _round(calls, roles)), ("warm", _round(calls, roles))]
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
    for label, figures in rounds:
        wall = figures["wall"]
        ours = sum(figures[role] for role in roles)
        rows.append(
            [
                label,
                f"{wall:.2f}",
                f"{wall / serial:.2f}",
                f"{calls / wall:,.0f}",
                *(f"{1000 * figures[role] / calls:.2f}" for role in roles),
                f"{max(0.0, figures['machine'] - ours) / wall:.1f}",
            ]
        )
    print_table(
        f"@distributed: {calls:,} calls of sleep({SLEEP}), {WORKERS} workers, threads={THREADS}",
        [
            "round",
            "wall s",
            "wall / serial",
            "calls/s",
            *(f"{role} CPU ms/call" for role in roles),
            "others' cores busy",
        ],
        rows,
        note=(
            f"serial: {serial:.1f} s; target: wall / serial < 0.5; ideal "
            f"{calls * SLEEP / (WORKERS * THREADS):.2f} s ({machine_load()})"
        ),
    )
    return [figures for _, figures in rounds]


if __name__ == "__main__":
    run()
