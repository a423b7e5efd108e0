"""Workers: 10, 100 and 1,000 worker sessions on one mosquitto around the real scheduler.

Processes, for each fleet size N (everything fresh per size, spawned): mosquitto
(LocalBroker, its config as shipped); ceil(N / 250) fleet processes, each holding up to
250 simulated workers (`bench/fleet.py`: one real MQTT session each, protocol-faithful,
no-op jobs answered at once); the scheduler process (`SchedulerNode`, SQLite, no
initiator); and this process, the driver, submitting on one Bus and following every
artifact's retained status.

Per size: the N sessions connect and say their presence; the scheduler starts and takes
their retained presence (until a `Parallel(noop)` binds to all N); then one artifact
bound to all of them, `Iterate(R, [Parallel(noop, Pairwise())])` with R = jobs / N (each
worker runs a chain of R jobs, all workers at once), and meanwhile a stream of small
workflows (three no-op tasks a → b → c, each pinned to a worker drawn at random)
submitted at a fixed rate until the big artifact completes (a turn is skipped while
STREAM_IN_FLIGHT are not completed: a scheduler that falls behind is not buried).
Before it, SMALL_ALONE small workflows alone, for their unloaded latency and their cost
to the scheduler.

Figures: scheduling rate (the big artifact's jobs over its submit → completed time);
the scheduler's turnaround per dependent job (a worker's result for round r → its
JobReady for round r + 1, seen by the worker: two broker hops and the scheduler);
submit → completed of the small workflows (p50/p95/p99); scheduler and broker RSS (idle
with N workers, and peak); CPU per job of the scheduler, the broker and the fleet; the
messages a job costs on the workers' side.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import resource
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench._report import console, cpu_ticks, machine_load, median_of_runs, percentile, print_table
from bench.fleet import OPERATION, Fleet, Stats
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    Iterate,
    Operation,
    Pairwise,
    Parallel,
    Tasks,
)
from flotta_mqtt.model.states import ARTIFACT_FINAL
from flotta_mqtt.model.workflow import Task
from flotta_mqtt.protocol import ArtifactStatus, decode, topics
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings

log = logging.getLogger("bench.workers")

SPAWN = mp.get_context("spawn")
PROJECT = "fleet"
SIZES = (10, 100, 1_000)
SESSIONS_PER_PROCESS = 250
FLEET_LIFETIME = 1_800.0  # a fleet process ends after this long whatever happens
START_TIMEOUT = 180.0  # for the sessions to connect, the scheduler to see them all
RUN_TIMEOUT = 600.0  # for the big artifact
SMALL_ALONE = 30  # small workflows measured with nothing else running
STREAM_IN_FLIGHT = 10  # the stream skips its turn while this many are not completed
FINAL_VALUES = {state.value.encode() for state in ARTIFACT_FINAL}


def fleet_artifact(rounds: int) -> Artifact:
    """One artifact bound to every worker of the project: `rounds` dependent jobs each, a
    worker's round r + 1 taking its own round r's product (Pairwise: no barrier between
    rounds, which would make every job wait for, and list, all N products before it)."""
    step = Parallel(operation=Operation(name=OPERATION), distribution=Pairwise())
    return Artifact(project=PROJECT, steps=[Iterate(rounds=rounds, steps=[step])])


def small_workflow(workers: list[str]) -> Artifact:
    """Three no-op tasks a → b → c, on the given workers (one each)."""
    tasks = [
        Task(name=name, executor=OPERATION, depends=depends, worker=worker)
        for name, depends, worker in zip("abc", ([], ["a"], ["b"]), workers, strict=True)
    ]
    return Artifact(project=PROJECT, steps=[Tasks(tasks=tasks)])


# --- the processes ------------------------------------------------------------------------------


def _fleet_main(names: list[str], host: str, port: int, store_url: str, conn: Connection) -> None:
    """Serve `names` until told to stop (or FLEET_LIFETIME); answer "stats" with Stats."""
    logging.basicConfig(level=logging.WARNING, format="[fleet] %(levelname)s %(message)s")
    fleet = Fleet(names, host, port, PROJECT, store_url)
    deadline = time.monotonic() + FLEET_LIFETIME
    announced = False
    try:
        while time.monotonic() < deadline:
            fleet.step(0.05)
            if not announced and fleet.ready == len(names):
                conn.send("ready")
                announced = True
            if conn.poll():
                if conn.recv() != "stats":
                    break
                conn.send(fleet.stats)
    finally:
        fleet.stop()


def _scheduler_main(url: str, store_url: str, database: str, ready: Any, stop: Any) -> None:
    logging.basicConfig(level=logging.WARNING, format="[scheduler] %(levelname)s %(message)s")
    from flotta_mqtt.nodes import SchedulerNode
    from flotta_mqtt.scheduler.config import SchedulerConfig
    from flotta_mqtt.transport.settings import StorageSettings

    scheduler = SchedulerNode(
        SchedulerConfig(
            broker=BrokerSettings(url=url),
            storage=StorageSettings(url=store_url),
            database=Path(database),
            run_initiator=False,  # no job here is the initiator's
        )
    ).start()
    ready.set()
    stop.wait(FLEET_LIFETIME)
    scheduler.stop()


class Driver:
    """Submits artifacts and stamps the arrival of each one's final status."""

    def __init__(self, url: str) -> None:
        self._changed = threading.Condition()
        self.submitted: dict[str, float] = {}
        self.final: dict[str, tuple[float, ArtifactStatus]] = {}
        self.bus = Bus(
            "bench-fleet-driver",
            BrokerSettings(url=url),
            on_message=self._message,
            subscriptions=[topics.ALL_STATUS],
            clean=True,
        ).start()

    def _message(self, topic: str, payload: bytes) -> None:
        at = payload.find(b'"state":"') + 9  # the artifact's own state comes first
        if at < 9 or payload[at : payload.find(b'"', at)] not in FINAL_VALUES:
            return
        arrived = time.perf_counter()
        _, status = decode(topic, payload)
        with self._changed:
            if isinstance(status, ArtifactStatus) and status.artifact_id not in self.final:
                self.final[status.artifact_id] = (arrived, status)
                self._changed.notify_all()

    def submit(self, artifact: Artifact) -> str:
        self.submitted[artifact.id] = time.perf_counter()
        self.bus.publish(topics.submit("bench-fleet-driver"), artifact)
        return artifact.id

    def wait(self, ids: list[str], timeout: float) -> bool:
        """Whether all of `ids` ended within `timeout` s."""
        with self._changed:
            return self._changed.wait_for(lambda: all(i in self.final for i in ids), timeout)

    def latency(self, artifact_id: str) -> float:
        """Seconds from submitting it to its final status, which must say completed."""
        arrived, status = self.final[artifact_id]
        if status.state is not ArtifactState.COMPLETED:
            raise RuntimeError(f"artifact {artifact_id} ended {status.state}: {status.error}")
        return arrived - self.submitted[artifact_id]

    def close(self) -> None:
        self.bus.stop()


# --- /proc ----------------------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> float:
    """A VmRSS/VmHWM figure of a process, in KiB (NaN if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def _busy_seconds(before: list[int] | None, after: list[int] | None) -> float:
    """CPU seconds the whole machine spent busy between two /proc/stat readings."""
    if before is None or after is None:
        return float("nan")
    delta = [a - b for a, b in zip(after[:8], before[:8], strict=True)]
    return (sum(delta) - delta[3] - delta[4]) / os.sysconf("SC_CLK_TCK")  # not idle, iowait


def _raise_fd_limit(needed: int) -> None:
    """Children (mosquitto among them) inherit it: one descriptor per session and more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(
            f"{needed} file descriptors needed for the broker's sessions, the hard limit is "
            f"{hard}: raise it (ulimit -Hn, or LimitNOFILE in a systemd unit)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# --- one size ------------------------------------------------------------------------------------


class _Cluster:
    """The broker, the fleet processes, the scheduler process and the driver of one size."""

    def __init__(self, workers: int, scratch: Path) -> None:
        self.names = [f"sim{i:05d}" for i in range(workers)]
        self.broker = LocalBroker(data_dir=scratch / "broker").start()
        assert self.broker.process is not None
        self.broker_pid = self.broker.process.pid
        self.store_url = (scratch / "store").as_uri()
        self.database = str(scratch / "scheduler.db")
        self.fleets: list[tuple[Any, Connection]] = []
        self.scheduler: Any = None
        self.stop_scheduler = SPAWN.Event()
        self.driver: Driver | None = None
        self.figures: dict[str, float] = {"broker_empty_kb": _status_kb(self.broker_pid, "VmRSS")}

    def start(self) -> None:
        started = time.perf_counter()
        for first in range(0, len(self.names), SESSIONS_PER_PROCESS):
            ours, theirs = SPAWN.Pipe()
            names = self.names[first : first + SESSIONS_PER_PROCESS]
            args = (names, self.broker.host, self.broker.port, self.store_url, theirs)
            process = SPAWN.Process(target=_fleet_main, args=args, name="fleet")
            process.start()
            self.fleets.append((process, ours))
        for _, conn in self.fleets:
            if not conn.poll(START_TIMEOUT) or conn.recv() != "ready":
                raise RuntimeError(f"a fleet process did not connect in {START_TIMEOUT} s")
        self.figures["connect_s"] = time.perf_counter() - started
        self.figures["broker_idle_kb"] = _status_kb(self.broker_pid, "VmRSS")

        started = time.perf_counter()
        ready = SPAWN.Event()
        self.scheduler = SPAWN.Process(
            target=_scheduler_main,
            args=(self.broker.url, self.store_url, self.database, ready, self.stop_scheduler),
            name="scheduler",
        )
        self.scheduler.start()
        if not ready.wait(START_TIMEOUT):
            raise RuntimeError("the scheduler process did not start")
        self.driver = Driver(self.broker.url)
        self._until_all_bound(started)

    def _until_all_bound(self, started: float) -> None:
        """Submit a one-round artifact until it binds to every worker: the scheduler has
        taken every retained presence then."""
        assert self.driver is not None
        deadline = time.perf_counter() + START_TIMEOUT
        while time.perf_counter() < deadline:
            probe = self.driver.submit(fleet_artifact(1))
            if not self.driver.wait([probe], START_TIMEOUT):
                break
            status = self.driver.final[probe][1]
            if status.state is ArtifactState.COMPLETED and status.total == len(self.names):
                self.figures["presence_s"] = time.perf_counter() - started
                self.figures["presence_cpu"] = _cpu_seconds([self.scheduler.pid])
                self.figures["scheduler_idle_kb"] = _status_kb(self.scheduler.pid, "VmRSS")
                return
            time.sleep(0.5)  # its presence is on its way: pacing, not synchronisation
        raise RuntimeError(f"the scheduler never bound an artifact to all {len(self.names)}")

    def pids(self) -> dict[str, list[int]]:
        return {
            "scheduler": [self.scheduler.pid],
            "broker": [self.broker_pid],
            "fleet": [process.pid for process, _ in self.fleets],
        }

    def stats(self) -> Stats:
        total = Stats()
        for _, conn in self.fleets:
            conn.send("stats")
            if not conn.poll(60):
                raise RuntimeError("a fleet process did not answer")
            total.add(conn.recv())
        return total

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()
        self.stop_scheduler.set()
        if self.scheduler is not None:
            self.scheduler.join(30)
        for _, conn in self.fleets:
            conn.send("stop")
        for process in [p for p, _ in self.fleets] + [self.scheduler]:
            if process is not None and process.is_alive():
                process.join(30)
                if process.is_alive():
                    process.terminate()
        self.broker.cleanup()


def measure(workers: int, jobs: int, stream_rate: float, seed: int = 0) -> dict[str, float]:
    """One fleet size, everything fresh: the figures `run` tabulates."""
    _raise_fd_limit(workers + 1_024)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="fb-workers-") as scratch:
        cluster = _Cluster(workers, Path(scratch))
        try:
            cluster.start()
            assert cluster.driver is not None
            return _run_load(cluster, cluster.driver, jobs, stream_rate, rng)
        finally:
            cluster.close()


def _run_load(
    cluster: _Cluster, driver: Driver, jobs: int, stream_rate: float, rng: random.Random
) -> dict[str, float]:
    """Small workflows alone, then the big artifact with the stream of them meanwhile."""
    workers = len(cluster.names)
    pids = cluster.pids()
    alone = _small_alone(cluster, driver, stream_rate, rng)
    before = {role: _cpu_seconds(group) for role, group in pids.items()}
    ticks_before, started = cpu_ticks(), time.perf_counter()
    seen_before = cluster.stats()
    big = driver.submit(fleet_artifact(max(1, jobs // workers)))
    small: list[str] = []
    skipped = 0
    next_at = time.perf_counter()
    deadline = next_at + RUN_TIMEOUT
    while not driver.wait([big], max(0.0, next_at - time.perf_counter())):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the big artifact did not complete in {RUN_TIMEOUT} s")
        next_at += 1.0 / stream_rate
        if sum(i not in driver.final for i in small) < STREAM_IN_FLIGHT:
            small.append(driver.submit(small_workflow(rng.sample(cluster.names, 3))))
        else:  # the scheduler is behind: an open stream would only grow its backlog
            skipped += 1
    if not driver.wait(small, 60):
        raise RuntimeError("small workflows did not complete in 60 s after the big one")
    used = {role: _cpu_seconds(group) - before[role] for role, group in pids.items()}
    busy = _busy_seconds(ticks_before, cpu_ticks())
    capacity = (time.perf_counter() - started) * (os.cpu_count() or 1)
    seen = cluster.stats()
    big_s = driver.latency(big)
    big_jobs = max(1, jobs // workers) * workers
    done = seen.jobs - seen_before.jobs
    latencies = [driver.latency(i) * 1e3 for i in small]
    turnaround = [t * 1e3 for t in seen.turnaround[len(seen_before.turnaround) :]]
    received = seen.received - seen_before.received
    sent = seen.sent - seen_before.sent
    small_cpu = alone["small_cpu"] * len(small) / 1e3  # the stream's share, as measured alone
    return (
        cluster.figures
        | alone
        | {
            "workers": workers,
            "cpu_big": (used["scheduler"] - small_cpu) * 1e3 / big_jobs,
            "big_jobs": big_jobs,
            "big_s": big_s,
            "rate": big_jobs / big_s,
            "small": len(small),
            "skipped": skipped,
            "small_p50": percentile(latencies, 0.5),
            "small_p95": percentile(latencies, 0.95),
            "small_p99": percentile(latencies, 0.99),
            "turn_p50": percentile(turnaround, 0.5),
            "turn_p95": percentile(turnaround, 0.95),
            "turn_p99": percentile(turnaround, 0.99),
            "scheduler_peak_kb": _status_kb(pids["scheduler"][0], "VmHWM"),
            "broker_peak_kb": _status_kb(cluster.broker_pid, "VmHWM"),
            "fleet_kb": sum(_status_kb(pid, "VmRSS") for pid in pids["fleet"]),
            **{f"cpu_{role}": seconds * 1e3 / done for role, seconds in used.items()},
            "machine_busy": busy / capacity,
            "others_busy": max(0.0, busy - sum(used.values())) / capacity,
            "job_messages": (received["JobReady"] + received["JobBatch"]) / done,
            "ack_messages": received["EventAck"] / done,
            "event_messages": sent["events"] / done,
            "resent": seen.resent - seen_before.resent,
            "duplicates": seen.duplicates - seen_before.duplicates,
            "errors": seen.errors + seen.failed + seen.stale,
            "reconnects": seen.connects - workers,
        }
    )


def _small_alone(
    cluster: _Cluster, driver: Driver, stream_rate: float, rng: random.Random
) -> dict[str, float]:
    """SMALL_ALONE small workflows at the stream's rate with nothing else running: their
    latency unloaded, and what one costs the scheduler (binding included) at this N."""
    scheduler = cluster.pids()["scheduler"]
    before = _cpu_seconds(scheduler)
    ids = []
    for _ in range(SMALL_ALONE):
        ids.append(driver.submit(small_workflow(rng.sample(cluster.names, 3))))
        time.sleep(1.0 / stream_rate)  # the stream's pace
    if not driver.wait(ids, 60):
        raise RuntimeError("small workflows alone did not complete in 60 s")
    latencies = [driver.latency(i) * 1e3 for i in ids]
    return {
        "alone_p50": percentile(latencies, 0.5),
        "alone_p95": percentile(latencies, 0.95),
        "small_cpu": (_cpu_seconds(scheduler) - before) * 1e3 / SMALL_ALONE,
    }


ROWS: list[tuple[str, str, str, float]] = [  # label, figure, format, scale
    ("jobs of the big artifact (R rounds x N)", "big_jobs", "{:,.0f}", 1.0),
    ("N sessions connected, presence said", "connect_s", "{:,.1f} s", 1.0),
    ("scheduler start → bound to all N", "presence_s", "{:,.1f} s", 1.0),
    ("  its CPU (start-up and N presences)", "presence_cpu", "{:,.2f} s", 1.0),
    ("big artifact: submit → completed", "big_s", "{:,.2f} s", 1.0),
    ("scheduling rate (big artifact)", "rate", "{:,.0f} jobs/s", 1.0),
    ("turnaround per dependent job p50", "turn_p50", "{:,.1f} ms", 1.0),
    ("  p95", "turn_p95", "{:,.1f} ms", 1.0),
    ("  p99", "turn_p99", "{:,.1f} ms", 1.0),
    ("small workflow alone: submit → completed p50", "alone_p50", "{:,.0f} ms", 1.0),
    ("  p95", "alone_p95", "{:,.0f} ms", 1.0),
    ("small workflows submitted meanwhile", "small", "{:,.0f}", 1.0),
    (f"  not submitted: {STREAM_IN_FLIGHT} in flight already", "skipped", "{:,.0f}", 1.0),
    ("small workflow submit → completed p50", "small_p50", "{:,.0f} ms", 1.0),
    ("  p95", "small_p95", "{:,.0f} ms", 1.0),
    ("  p99", "small_p99", "{:,.0f} ms", 1.0),
    ("scheduler RSS, idle with N workers", "scheduler_idle_kb", "{:,.0f} MB", 1 / 1024),
    ("scheduler RSS, peak", "scheduler_peak_kb", "{:,.0f} MB", 1 / 1024),
    ("broker RSS, no session", "broker_empty_kb", "{:,.1f} MB", 1 / 1024),
    ("broker RSS, N idle sessions", "broker_idle_kb", "{:,.1f} MB", 1 / 1024),
    ("broker RSS, peak", "broker_peak_kb", "{:,.1f} MB", 1 / 1024),
    ("fleet processes' RSS (all)", "fleet_kb", "{:,.0f} MB", 1 / 1024),
    ("machine's CPU busy during the run", "machine_busy", "{:.0%}", 1.0),
    ("  of which not this bench's processes", "others_busy", "{:.0%}", 1.0),
    ("scheduler CPU per small workflow (alone)", "small_cpu", "{:,.1f} ms", 1.0),
    ("scheduler CPU per big-artifact job", "cpu_big", "{:,.2f} ms", 1.0),
    ("CPU per job, all jobs: scheduler", "cpu_scheduler", "{:,.2f} ms", 1.0),
    ("  broker", "cpu_broker", "{:,.2f} ms", 1.0),
    ("  simulated workers", "cpu_fleet", "{:,.2f} ms", 1.0),
    ("messages per job to workers: jobs", "job_messages", "{:,.2f}", 1.0),
    ("  acknowledgements", "ack_messages", "{:,.2f}", 1.0),
    ("messages per job from workers", "event_messages", "{:,.2f}", 1.0),
    ("results re-sent / duplicates / reconnects / errors", "resent", "{:,.0f}", 1.0),
]


def run(
    runs: int = 1,
    sizes: tuple[int, ...] = SIZES,
    jobs: int = 10_000,
    stream_rate: float = 10.0,
) -> None:
    load = machine_load()
    results: dict[int, dict[str, float]] = {}
    failures = []
    for n in sizes:
        try:
            results[n] = median_of_runs([measure(n, jobs, stream_rate, s) for s in range(runs)])
        except RuntimeError as exc:  # the other sizes are still worth printing
            failures.append(f"N = {n:,}: {exc}")
            results[n] = {}
        console.print(f"workers: N = {n:,} measured ({machine_load()})")

    def cell(figures: dict[str, float], key: str, fmt: str, scale: float) -> str:
        if not figures:
            return "failed"
        if key == "resent":
            health = ("resent", "duplicates", "reconnects", "errors")
            return " / ".join(f"{figures[name]:,.0f}" for name in health)
        return fmt.format(figures[key] * scale)

    rows = [
        [label, *(cell(results[n], key, fmt, scale) for n in sizes)]
        for label, key, fmt, scale in ROWS
    ]
    print_table(
        f"workers: N simulated workers (real MQTT sessions, {SESSIONS_PER_PROCESS} per process) "
        "on one mosquitto around the real scheduler; one artifact Iterate(R, [Parallel(noop, "
        f"Pairwise())]) bound to all N with R = {jobs:,} / N, and {stream_rate:g} small "
        f"workflows/s (a → b → c) meanwhile; median of {runs} run(s); {load} before, "
        f"{machine_load()} after",
        ["figure", *(f"N = {n:,}" for n in sizes)],
        rows,
        note="\n".join(failures),
    )
