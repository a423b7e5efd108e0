"""Binding large artifacts: time, peak memory, lock-table drain and persisting the graph.

The artifact is `Iterate(R, [Parallel(noop, Collect()), Finalize(noop, Distribute())])`
over 99 workers: 100 jobs per round (99 worker jobs and one Finalize on the initiator),
so R = 1,000 gives 100,000 jobs and 197,901 locks, R = 100 gives 10,000 jobs.

Figures, each the median over `--runs`:
- bind: `bind(artifact, context)` → JobGraph (check_steps, jobs, networkx DiGraph);
- peak / retained memory: tracemalloc around `bind` alone (a separate pass, since tracing
  slows Python down); retained is what the JobGraph still holds afterwards;
- LockTable build: counting the unreleased locks on every job;
- drain: completing every job in ready order through `LockTable.release` until none is
  left, and the same with the look-ups the scheduler does per completion
  (`graph.unlocks(job)` for LocksReleased, `graph.consumes(next)` for each JobReady);
- persist: `Repository.bind_artifact` (jobs and locks rows) in one SQLite transaction, as
  the scheduler does when it binds.
"""

from __future__ import annotations

import gc
import tempfile
import time
import tracemalloc
from collections import deque
from pathlib import Path

from bench._report import machine_load, median_of_runs, print_table
from flotta_mqtt.model import (
    Artifact,
    Collect,
    Distribute,
    Finalize,
    Iterate,
    JobGraph,
    LockTable,
    Operation,
    Parallel,
    SchedulerContext,
    bind,
)
from flotta_mqtt.scheduler.sqlite_repository import SqliteRepository

WORKERS = 99
SIZES = (100, 1_000)  # rounds: 10,000 and 100,000 jobs


def artifact_of(rounds: int) -> Artifact:
    op = Operation(name="noop")
    return Artifact(
        project="bench",
        steps=[
            Iterate(
                rounds=rounds,
                steps=[
                    Parallel(operation=op, distribution=Collect()),
                    Finalize(operation=op, distribution=Distribute()),
                ],
            )
        ],
    )


def context_of(workers: int) -> SchedulerContext:
    return SchedulerContext.of("scheduler.initiator", [f"w{i:03d}" for i in range(workers)])


def drain(table: LockTable) -> int:
    """Complete every job in ready order; return how many completed."""
    ready = deque(table.ready())
    done = 0
    while ready:
        job = ready.popleft()
        done += 1
        ready.extend(table.release(job))
    return done


def drain_like_scheduler(graph: JobGraph, table: LockTable) -> int:
    """As `drain`, plus the graph look-ups the scheduler makes for each completion."""
    ready = deque(table.ready())
    done = 0
    while ready:
        job = ready.popleft()
        done += 1
        graph.unlocks(job)  # LocksReleased
        unlocked = table.release(job)
        for nxt in unlocked:
            graph.consumes(nxt)  # the inputs of its JobReady
        ready.extend(unlocked)
    return done


def measure(rounds: int, workers: int, scratch: Path) -> dict[str, float]:
    artifact = artifact_of(rounds)
    context = context_of(workers)
    gc.collect()

    start = time.perf_counter()
    graph = bind(artifact, context)
    bind_s = time.perf_counter() - start
    jobs, locks = len(graph), graph.graph.number_of_edges()

    start = time.perf_counter()
    table = LockTable(graph)
    table_s = time.perf_counter() - start
    start = time.perf_counter()
    done = drain(table)
    drain_s = time.perf_counter() - start
    if done != jobs:
        raise AssertionError(f"drain completed {done} of {jobs} jobs")

    table = LockTable(graph)
    start = time.perf_counter()
    done = drain_like_scheduler(graph, table)
    drain_full_s = time.perf_counter() - start
    if done != jobs:
        raise AssertionError(f"drain completed {done} of {jobs} jobs")

    db = SqliteRepository(scratch / f"bind-{rounds}-{time.monotonic_ns()}.db")
    try:
        start = time.perf_counter()
        with db.transaction():
            db.bind_artifact(artifact.id, context, graph)
        persist_s = time.perf_counter() - start
    finally:
        db.close()

    del graph, table
    gc.collect()
    tracemalloc.start()
    try:
        graph = bind(artifact, context)
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del graph
    gc.collect()

    return {
        "jobs": jobs,
        "locks": locks,
        "bind_s": bind_s,
        "peak_mb": peak / 2**20,
        "retained_mb": retained / 2**20,
        "table_s": table_s,
        "drain_s": drain_s,
        "drain_full_s": drain_full_s,
        "persist_s": persist_s,
    }


def run(runs: int = 1, workers: int = WORKERS, sizes: tuple[int, ...] = SIZES) -> None:
    with tempfile.TemporaryDirectory(prefix="flotta-bench-") as scratch:
        results = [
            median_of_runs([measure(rounds, workers, Path(scratch)) for _ in range(runs)])
            for rounds in sizes
        ]

    def each(fmt: str, key: str, scale: float = 1.0, per_job: bool = False) -> list[str]:
        return [fmt.format(r[key] * scale * (1e6 / r["jobs"] if per_job else 1.0)) for r in results]

    rows = [
        ["locks", *each("{:,.0f}", "locks")],
        ["bind", *each("{:,.0f} ms", "bind_s", 1e3)],
        ["bind per job", *each("{:.1f} µs", "bind_s", per_job=True)],
        ["bind peak memory (tracemalloc)", *each("{:,.1f} MiB", "peak_mb")],
        ["JobGraph retained after bind", *each("{:,.1f} MiB", "retained_mb")],
        ["LockTable build", *each("{:,.0f} ms", "table_s", 1e3)],
        ["LockTable drain (release all)", *each("{:,.0f} ms", "drain_s", 1e3)],
        ["LockTable drain per job", *each("{:.2f} µs", "drain_s", per_job=True)],
        ["drain + unlocks()/consumes() per job", *each("{:.2f} µs", "drain_full_s", per_job=True)],
        ["persist jobs+locks (SQLite, 1 txn)", *each("{:,.0f} ms", "persist_s", 1e3)],
    ]
    print_table(
        f"binding: Iterate(R, [Parallel(noop, Collect()), Finalize(noop, Distribute())]), "
        f"{workers} workers, median of {runs} run(s); {machine_load()}",
        ["", *(f"{r['jobs']:,.0f} jobs" for r in results)],
        rows,
    )


if __name__ == "__main__":
    run()
