"""What each worker costs the scheduler, at 1,000 to 100,000 workers, without a network.

The `workers` bench runs real sessions, which this machine holds up to a few thousand.
Past that, the scheduler's own code is measured here as `scale` measures it: its core
and repository in a fresh process, driven burst by burst as its service drives them (500
messages a transaction, every message it decides encoded, nothing published). For N
workers: their N retained presences as they arrive on subscribing (CPU and memory per
worker); then SUBMISSIONS small workflows (`bench.workers.small_workflow`, three tasks
pinned to workers drawn at random), each alone in its burst (CPU each, binding
included: it lists every worker able to run a task); then the one artifact bound to all
N (`bench.workers.fleet_artifact(1)`: submit → its N JobReady encoded). The status of
each artifact is built as the service builds it; its size is measured rather than
encoded, since encoding refuses one over MAX_MESSAGE_BYTES (the service logs that, and
publishes no status).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import random
import resource
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench._report import machine_load, print_table
from bench.scale import CoreDriver, rss_mb

SPAWN = mp.get_context("spawn")
SIZES = (1_000, 10_000, 100_000)
SUBMISSIONS = 20
BURST = 500  # the scheduler's BURST: messages per transaction


def _core_main(workers: int, database: str, conn: Connection) -> None:
    logging.basicConfig(level=logging.WARNING)
    from bench.fleet import OPERATION
    from bench.workers import PROJECT, fleet_artifact, small_workflow
    from flotta_mqtt.protocol import MAX_MESSAGE_BYTES, NodePresence, encode, topics
    from flotta_mqtt.scheduler.effects import Event, Received

    driver = CoreDriver(database)
    repository = driver.repository
    status_bytes: list[int] = []  # the size of each status built

    def burst(events: list[Event]) -> int:
        """One burst; how many messages it decided to publish."""
        decision, statuses = driver.burst(events)
        # Measured, not encoded: encode() refuses a status over the limit.
        status_bytes.extend(len(status.model_dump_json()) for status in statuses)
        return len(decision.publish)

    names = [f"sim{i:06d}" for i in range(workers)]
    arriving = [  # as the broker sends them: encoded, on their topics
        Received(
            topics.presence(name),
            encode(
                NodePresence(
                    node=name,
                    online=True,
                    projects=[PROJECT],
                    labels={"allow_code": "no"},
                    operations=[OPERATION],
                    executors=[OPERATION],
                    since=time.time(),
                )
            ),
            time.monotonic(),
        )
        for name in names
    ]
    gc.collect()
    rss_start = rss_mb()
    start = time.process_time()
    for first in range(0, workers, BURST):
        burst(list(arriving[first : first + BURST]))
    presence_s = time.process_time() - start
    del arriving
    gc.collect()
    rss_known = rss_mb()

    rng = random.Random(0)
    submit = topics.submit("bench")
    costs = []
    for _ in range(SUBMISSIONS):
        payload = encode(small_workflow(rng.sample(names, 3)))
        start = time.process_time()
        burst([Received(submit, payload, time.monotonic())])
        costs.append(time.process_time() - start)
    gc.collect()
    rss_submitted = rss_mb()

    payload = encode(fleet_artifact(1))
    start = time.process_time()
    ready = burst([Received(submit, payload, time.monotonic())])
    bind_s = time.process_time() - start
    repository.close()
    conn.send(
        {
            "presence_us": presence_s * 1e6 / workers,
            "presence_kb": (rss_known - rss_start) * 1024 / workers,
            "small_ms": sorted(costs)[len(costs) // 2] * 1e3,
            "small_kb": (rss_submitted - rss_known) * 1024 / SUBMISSIONS,
            "bind_s": bind_s,
            "bind_us": bind_s * 1e6 / workers,
            "ready": ready,
            "status_max": max(status_bytes),
            "status_over": sum(size > MAX_MESSAGE_BYTES for size in status_bytes),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


def measure(workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fb-per-worker-") as scratch:
        ours, theirs = SPAWN.Pipe()
        database = str(Path(scratch) / "scheduler.db")
        process = SPAWN.Process(target=_core_main, args=(workers, database, theirs))
        process.start()
        try:
            if not ours.poll(900):
                raise RuntimeError(f"no result for {workers} workers in 900 s")
            result: dict[str, Any] = ours.recv()
            return result
        finally:
            process.join(30)


def run(sizes: tuple[int, ...] = SIZES) -> None:
    load = machine_load()
    results = {n: measure(n) for n in sizes}
    rows = [
        ["a presence taken (CPU)", *(f"{results[n]['presence_us']:,.0f} µs" for n in sizes)],
        [
            "memory per worker known (RSS)",
            *(f"{results[n]['presence_kb']:,.1f} KiB" for n in sizes),
        ],
        ["a small workflow submitted (CPU)", *(f"{results[n]['small_ms']:,.1f} ms" for n in sizes)],
        [
            "  memory each holds while in flight",
            *(f"{results[n]['small_kb']:,.0f} KiB" for n in sizes),
        ],
        ["one artifact bound to all N (CPU)", *(f"{results[n]['bind_s']:,.2f} s" for n in sizes)],
        ["  per job", *(f"{results[n]['bind_us']:,.0f} µs" for n in sizes)],
        ["  messages it publishes at once", *(f"{results[n]['ready']:,}" for n in sizes)],
        ["largest status built", *(f"{results[n]['status_max']:,} B" for n in sizes)],
        ["  statuses over the message limit", *(f"{results[n]['status_over']:,}" for n in sizes)],
        ["scheduler process peak RSS", *(f"{results[n]['peak_mb']:,.0f} MB" for n in sizes)],
    ]
    print_table(
        f"per worker: the scheduler's core and repository with N workers known, without a "
        f"network (CPU time of its process; a small workflow: the median of {SUBMISSIONS}); "
        f"{load} before, {machine_load()} after",
        ["figure", *(f"N = {n:,}" for n in sizes)],
        rows,
    )
