"""Scale: 100,000 jobs bound and scheduled by the real scheduler code, without a network.

In a fresh process (so its memory is the scheduler's alone): the scheduler's core and
repository, driven here burst by burst as its service drives them (no broker):
99 workers' presence; the submission of `Iterate(1000, [Parallel(noop, Collect()),
Finalize(noop, Distribute())])` (100 jobs a round: 100,000 jobs and 197,901 locks), bound
and persisted in SQLite; then every JobReady it publishes is answered with the encoded
JobFinished its worker would send (decoded, validated and handled as on the bus, 500 per
transaction, statuses and acknowledgements built and encoded, nothing published), until
the artifact completes.

Figures: the time to bind (submit → first JobReady ready to publish), the time to
schedule everything after that (per job), the scheduler process's peak RSS, and memory:
what the bound artifact held while running, per job, and what is left per finished job
once the artifact is done (the database keeps the jobs, the process should not).
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing as mp
import random
import resource
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench._report import machine_load, print_table

SPAWN = mp.get_context("spawn")
WORKERS = 99
BURST = 500


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class CoreDriver:
    """The scheduler's core and repository in this process, driven burst by burst as its
    service drives them, with no broker: for benches of the scheduler's own costs."""

    def __init__(self, database: str) -> None:
        from flotta_mqtt.scheduler.config import SchedulerConfig
        from flotta_mqtt.scheduler.core import Policies, SchedulerCore
        from flotta_mqtt.scheduler.databases import open_repository
        from flotta_mqtt.scheduler.metrics import SchedulerMetrics
        from flotta_mqtt.transport.store import ResourceStore

        self.config = SchedulerConfig(
            database=Path(database), run_initiator=False, worker_grace=0.0
        )
        self.repository = open_repository(self.config.database, self.config.name)
        self.core = SchedulerCore(
            self.config, SchedulerMetrics(), Policies.of(self.config, random.Random(0))
        )
        self.store = ResourceStore((Path(database).parent / "store").as_uri())
        self.core.restore([], {}, {}, [], self.clock())

    @staticmethod
    def clock() -> Any:
        from flotta_mqtt.scheduler.effects import Clock

        now = time.monotonic()
        return Clock(now, time.time(), now)

    def burst(self, events: list[Any]) -> tuple[Any, list[Any]]:
        """One burst as the service handles it: decided, written in one transaction, what
        it publishes encoded; the decision and the statuses built after the commit."""
        from flotta_mqtt.protocol import encode
        from flotta_mqtt.scheduler.announcements import build_status

        decision = self.core.handle(events, self.clock())
        with self.repository.transaction():
            self.repository.apply(decision.writes)
        for _topic, message, _retain in decision.publish:
            encode(message)
        statuses = [
            build_status(record, wall, self.config.allow_download, self._manifest)
            for record, wall in decision.statuses
        ]
        return decision, statuses

    def _manifest(self, artifact_id: str, results: list[Any]) -> Any:
        from flotta_mqtt.transport.store import RESULTS_MANIFEST

        data = json.dumps([r.model_dump(mode="json") for r in results]).encode()
        return self.store.put(
            self.store.results_url(artifact_id), data, media_type=RESULTS_MANIFEST
        )


def _scale_main(jobs: int, database: str, conn: Connection) -> None:
    logging.basicConfig(level=logging.WARNING)
    from bench.binding import artifact_of
    from flotta_mqtt.model import ArtifactState
    from flotta_mqtt.protocol import JobFinished, JobReady, NodePresence, Resource, encode, topics
    from flotta_mqtt.scheduler.effects import Event, Received

    driver = CoreDriver(database)
    core, repository = driver.core, driver.repository

    def burst(events: list[Event]) -> list[Any]:
        """One burst, its statuses encoded; the JobReady kept."""
        decision, statuses = driver.burst(events)
        for status in statuses:
            encode(status)
        return [m for _, m, _ in decision.publish if isinstance(m, JobReady)]

    now = time.time()
    presence = [
        NodePresence(
            node=f"w{i:03d}", online=True, projects=["bench"], operations=["noop"], since=now
        )
        for i in range(WORKERS)
    ]
    burst([Received(topics.presence(p.node), encode(p), time.monotonic()) for p in presence])
    artifact = artifact_of(jobs // 100)
    gc.collect()
    rss_start = rss_mb()

    start = time.perf_counter()
    pending = burst([Received(topics.submit("bench"), encode(artifact), time.monotonic())])
    bind_s = time.perf_counter() - start
    rss_bound = rss_mb()
    record = core.artifacts[artifact.id]
    total = len(record.jobs)

    start = time.perf_counter()
    finished = 0
    while pending:
        taken, pending = pending[:BURST], pending[BURST:]
        events: list[Event] = []
        for job in taken:
            worker = record.worker(job.job_id)
            product = Resource(
                url=f"file:///bench/artifacts/{job.artifact_id}/jobs/{job.job_id}/attempt-1/product",
                sha256="0" * 64,
                size=4,
            )
            event = JobFinished(job=job.ref, product=product, started_at=now, finished_at=now)
            events.append(Received(topics.events(worker), encode(event), time.monotonic()))
            finished += 1
        pending += burst(events)
    schedule_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state = repository.artifact(artifact.id)
    if state is None or state.state is not ArtifactState.COMPLETED or finished != total:
        raise RuntimeError(f"finished {finished} of {total} jobs; the artifact is {state}")
    del record
    gc.collect()
    rss_end = rss_mb()
    repository.close()
    conn.send(
        {
            "jobs": total,
            "bind_s": bind_s,
            "schedule_s": schedule_s,
            "peak_mb": peak_mb,
            "start_mb": rss_start,
            "bound_kb_per_job": (rss_bound - rss_start) * 1024 / total,
            "left_kb_per_job": (rss_end - rss_start) * 1024 / total,
        }
    )


def measure(jobs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fb-scale-") as scratch:
        ours, theirs = SPAWN.Pipe()
        process = SPAWN.Process(
            target=_scale_main, args=(jobs, str(Path(scratch) / "scheduler.db"), theirs)
        )
        process.start()
        try:
            if not ours.poll(900):
                raise RuntimeError("the scale run gave no result in 900 s")
            result: dict[str, float] = ours.recv()
            return result
        finally:
            process.join(30)


def run(runs: int = 1, jobs: int = 100_000) -> None:
    results = [measure(jobs) for _ in range(runs)]

    def cell(key: str, fmt: str, scale: float = 1.0) -> str:
        values = [r[key] * scale for r in results]
        middle = fmt.format(statistics.median(values))
        return f"{middle} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    n = results[0]["jobs"]
    rows = [
        ["bind (submit → first JobReady encoded)", cell("bind_s", "{:,.2f}", 1.0) + " s"],
        ["schedule the rest (finished → next ready)", cell("schedule_s", "{:,.1f}") + " s"],
        ["  per job", cell("schedule_s", "{:,.1f}", 1e6 / n) + " µs"],
        ["scheduler process peak RSS", cell("peak_mb", "{:,.0f}") + " MB"],
        ["  of which before submitting", cell("start_mb", "{:,.0f}") + " MB"],
        ["bound artifact, per job (RSS)", cell("bound_kb_per_job", "{:,.2f}") + " KiB"],
        ["left per finished job (RSS)", cell("left_kb_per_job", "{:,.3f}") + " KiB"],
    ]
    print_table(
        f"scale: {n:,.0f} jobs (Iterate(1000, [Parallel(noop, Collect()), Finalize(noop, "
        f"Distribute())]) over {WORKERS} workers), the scheduler's code without a network, "
        f"median of {runs} run(s) (min-max); {machine_load()}",
        ["figure", "value"],
        rows,
        note="target: 100,000 jobs bound and scheduled with the scheduler's peak memory < 500 MB",
    )


if __name__ == "__main__":
    run()
