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
import json
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
from bench.scale import _rss_mb

SPAWN = mp.get_context("spawn")
SIZES = (1_000, 10_000, 100_000)
SUBMISSIONS = 20
BURST = 500  # the scheduler's BURST: messages per transaction


def _core_main(workers: int, database: str, conn: Connection) -> None:
    logging.basicConfig(level=logging.WARNING)
    from bench.fleet import OPERATION
    from bench.workers import PROJECT, fleet_artifact, small_workflow
    from flotta_mqtt.protocol import MAX_MESSAGE_BYTES, NodePresence, Resource, encode, topics
    from flotta_mqtt.scheduler.announcements import build_status
    from flotta_mqtt.scheduler.config import SchedulerConfig
    from flotta_mqtt.scheduler.core import Policies, SchedulerCore
    from flotta_mqtt.scheduler.databases import open_repository
    from flotta_mqtt.scheduler.effects import Clock, Event, Received
    from flotta_mqtt.scheduler.metrics import SchedulerMetrics
    from flotta_mqtt.transport.store import RESULTS_MANIFEST, ResourceStore

    config = SchedulerConfig(database=Path(database), run_initiator=False, worker_grace=0.0)
    repository = open_repository(config.database, config.name)
    core = SchedulerCore(config, SchedulerMetrics(), Policies.of(config, random.Random(0)))
    store = ResourceStore((Path(database).parent / "store").as_uri())

    def manifest(artifact_id: str, results: list[Resource]) -> Resource:
        data = json.dumps([r.model_dump(mode="json") for r in results]).encode()
        return store.put(store.results_url(artifact_id), data, media_type=RESULTS_MANIFEST)

    def clock() -> Clock:
        now = time.monotonic()
        return Clock(now, time.time(), now)

    status_bytes: list[int] = []  # the size of each status built

    def burst(events: list[Event]) -> int:
        """One burst as the service handles it; how many messages it decided to publish."""
        decision = core.handle(events, clock())
        with repository.transaction():
            repository.apply(decision.writes)
        for _topic, message, _retain in decision.publish:
            encode(message)
        for record, wall in decision.statuses:
            status = build_status(record, wall, config.allow_download, manifest)
            status_bytes.append(len(status.model_dump_json()))  # encode() refuses > limit
        return len(decision.publish)

    core.restore([], {}, {}, [], clock())
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
    rss_start = _rss_mb()
    start = time.process_time()
    for first in range(0, workers, BURST):
        burst(list(arriving[first : first + BURST]))
    presence_s = time.process_time() - start
    del arriving
    gc.collect()
    rss_known = _rss_mb()

    rng = random.Random(0)
    submit = topics.submit("bench")
    costs = []
    for _ in range(SUBMISSIONS):
        payload = encode(small_workflow(rng.sample(names, 3)))
        start = time.process_time()
        burst([Received(submit, payload, time.monotonic())])
        costs.append(time.process_time() - start)
    gc.collect()
    rss_submitted = _rss_mb()

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
