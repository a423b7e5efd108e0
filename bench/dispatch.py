"""Dispatch through a real mosquitto: the raw MQTT floor, then flotta_mqtt on top of it.

Processes (2 cores are enough): mosquitto; this process (the floor's client, then the
scheduler); an echo process for the floor; 4 worker processes (WorkerAgent, max_jobs=4);
a workbench process (the SDK Client submitting and waiting); an observer process (a Bus
subscribed to every worker's job topic and every worker's events, stamping arrivals).

(a) floor: raw paho, MQTT v5, QoS 1 both ways, TCP_NODELAY, one echo process: the
    sequential round trip publish → echo → receive, and the pipelined echo rate with at
    most 100 round trips outstanding.
(b) fan-out: 500 artifacts `[Parallel(noop)]` (4 jobs each, 2,000 independent jobs)
    submitted back to back; jobs/s from the first submit to the last completion the
    workbench sees; dispatch → start per job, where dispatch is the moment the scheduler
    hands a JobReady to its bus (stamped by wrapping `publish` and `publish_many` of this
    scheduler's bus) and start is `JobStarted.at` from the worker, or a quick job's
    `started_at` from its result (same machine clock); also observer-saw-JobReady → start.
(c) chain: `Iterate(300, [Parallel(noop)])` in a project only one worker holds: 300
    jobs, each locked behind the one before; ms per link = wall time / 300, plus the
    unloaded dispatch → start and the scheduler's turnaround (observer saw JobFinished of
    link i → observer saw JobReady of link i + 1).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench._report import machine_load, median_of_runs, percentile, print_table
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import Artifact, ArtifactState, Iterate, JobState, Operation, Parallel
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import (
    JobFinished,
    JobReady,
    JobStarted,
    decode,
    topics,
    unbatch,
)
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

log = logging.getLogger("bench.dispatch")

SPAWN = mp.get_context("spawn")  # children start clean: no inherited paho threads
PING = "bench/floor/ping"  # the floor speaks raw MQTT, outside the protocol's topics
PONG = "bench/floor/pong"
FAN_PROJECT = "bench"
CHAIN_PROJECT = "chain"  # held by the first worker only
WORKERS = 4
MAX_JOBS = 4
FLOOR_WARMUP = 50
FLOOR_WINDOW = 100
FLOOR_PIPELINED = 5_000
NOOP = Operation(name="noop")

Key = tuple[str, int, int]  # artifact id, job id, attempt


# --- (a) the raw MQTT floor ------------------------------------------------------------------


def _raw_client(
    client_id: str,
    host: str,
    port: int,
    topic: str,
    on_payload: Callable[[mqtt.Client, bytes], None],
) -> mqtt.Client:
    """A paho v5 client with TCP_NODELAY, subscribed to `topic` at QoS 1 when it returns."""
    subscribed = threading.Event()

    def socket_open(client: mqtt.Client, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connected(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(topic, qos=1)

    def message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            on_payload(client, bytes(msg.payload))
        except Exception:  # an exception escaping kills paho's network thread
            log.exception("floor client %s", client_id)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(FLOOR_WINDOW)
    client.on_socket_open = socket_open
    client.on_connect = connected
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_message = message
    client.connect(host, port, keepalive=30, clean_start=True)
    client.loop_start()
    if not subscribed.wait(10):
        raise RuntimeError(f"{client_id}: no SUBACK from the broker at {host}:{port}")
    return client


def _echo_main(host: str, port: int, ready: Any, stop: Any) -> None:
    """The floor's echo process: every ping comes back as a pong, QoS 1."""

    def echo(client: mqtt.Client, payload: bytes) -> None:
        client.publish(PONG, payload, qos=1)

    client = _raw_client("bench-echo", host, port, PING, echo)
    ready.set()
    stop.wait()
    client.disconnect()
    client.loop_stop()


class _Floor:
    """The floor's measuring side: sequential round trips, then a pipelined echo rate."""

    def __init__(self, host: str, port: int) -> None:
        self._arrived = threading.Event()
        self._last = b""
        self._window = threading.BoundedSemaphore(FLOOR_WINDOW)
        self._expected = 0
        self._received = 0
        self._done = threading.Event()
        self._pipelined = False
        self.client = _raw_client("bench-floor", host, port, PONG, self._pong)

    def _pong(self, client: mqtt.Client, payload: bytes) -> None:
        if self._pipelined:
            self._received += 1
            self._window.release()
            if self._received == self._expected:
                self._done.set()
        else:
            self._last = payload
            self._arrived.set()

    def round_trips(self, count: int) -> list[float]:
        self._pipelined = False
        rtts = []
        for i in range(count + FLOOR_WARMUP):
            payload = i.to_bytes(4, "big")
            self._arrived.clear()
            start = time.perf_counter()
            self.client.publish(PING, payload, qos=1)
            if not self._arrived.wait(5) or self._last != payload:
                raise RuntimeError(f"floor: ping {i} did not come back")
            if i >= FLOOR_WARMUP:
                rtts.append(time.perf_counter() - start)
        return rtts

    def rate(self, count: int) -> float:
        """Round trips per second with at most FLOOR_WINDOW outstanding."""
        self._pipelined, self._expected, self._received = True, count, 0
        self._done.clear()
        start = time.perf_counter()
        for i in range(count):
            self._window.acquire()
            self.client.publish(PING, i.to_bytes(4, "big"), qos=1)
        if not self._done.wait(60):
            raise RuntimeError(f"floor: {self._received} of {count} pongs came back")
        return count / (time.perf_counter() - start)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def measure_floor(host: str, port: int, runs: int, count: int) -> list[dict[str, float]]:
    ready, stop = SPAWN.Event(), SPAWN.Event()
    echo = SPAWN.Process(target=_echo_main, args=(host, port, ready, stop), name="bench-echo")
    echo.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the echo process did not start")
        floor = _Floor(host, port)
        try:
            results = []
            for _ in range(runs):
                rtts = floor.round_trips(count)
                results.append(
                    {
                        "rtt_p50": percentile(rtts, 0.5) * 1e3,
                        "rtt_p99": percentile(rtts, 0.99) * 1e3,
                        "rate": floor.rate(FLOOR_PIPELINED),
                    }
                )
            return results
        finally:
            floor.close()
    finally:
        stop.set()
        echo.join(10)
        if echo.is_alive():
            echo.terminate()


# --- (b, c) flotta_mqtt: the node processes ---------------------------------------------------


def _worker_main(
    name: str, url: str, store_url: str, datasets: dict[str, list[str]], ready: Any, stop: Any
) -> None:
    logging.basicConfig(
        level=logging.WARNING, format=f"[{name}] %(levelname)s %(name)s: %(message)s"
    )
    agent = WorkerAgent(
        WorkerConfig(
            name=name,
            broker=BrokerSettings(url=url),
            storage=StorageSettings(url=store_url),
            datasets={project: [Path(p) for p in paths] for project, paths in datasets.items()},
            max_jobs=MAX_JOBS,
        )
    ).start()
    ready.set()
    stop.wait()
    agent.stop()


def _workbench_main(url: str, store_url: str, conn: Connection) -> None:
    """Submit what the main process sends, wait for all of it, send back the timings."""
    logging.basicConfig(
        level=logging.WARNING, format="[workbench] %(levelname)s %(name)s: %(message)s"
    )
    settings = BrokerSettings(url=url)
    with Client(settings, client_id="bench-workbench", storage=StorageSettings(url=store_url)) as c:
        conn.send("ready")
        while True:
            artifacts: list[Artifact] | None = conn.recv()
            if artifacts is None:
                break
            first = time.time()
            handles = [c.submit(artifact) for artifact in artifacts]
            submitted = time.time()
            statuses = [handle.wait(timeout=120) for handle in handles]
            conn.send(
                {
                    "first": first,
                    "submitted": submitted,
                    "last": time.time(),
                    "states": [s.state for s in statuses],
                    "totals": [s.total for s in statuses],
                    "completed": [s.counts.get(JobState.COMPLETED, 0) for s in statuses],
                }
            )


@dataclass
class Observed:
    """What the observer saw: first arrival of each JobReady and JobFinished, and JobStarted.at.

    `finished_at` holds each JobFinished's own (started_at, finished_at) from the worker.
    """

    ready_seen: dict[Key, float]
    started_at: dict[Key, float]
    finished_seen: dict[Key, float]
    finished_at: dict[Key, tuple[float, float]]
    counts: Counter[str]  # messages seen by type


def _observer_main(url: str, conn: Connection) -> None:
    """Stamp every job-ready and worker event on arrival; decode only when asked."""
    logging.basicConfig(
        level=logging.WARNING, format="[observer] %(levelname)s %(name)s: %(message)s"
    )
    records: list[tuple[float, str, bytes]] = []
    bus = Bus(
        "bench-observer",
        BrokerSettings(url=url),
        on_message=lambda topic, payload: records.append((time.time(), topic, payload)),
        subscriptions=[topics.jobs("+"), topics.ALL_EVENTS],
        clean=True,
    ).start()
    conn.send("ready")
    while conn.recv() == "collect":
        taken = len(records)
        batch, records[:taken] = records[:taken], []
        observed = Observed({}, {}, {}, {}, Counter())
        for at, topic, payload in batch:
            _, received = decode(topic, payload)
            observed.counts["messages"] += 1
            for message in unbatch(received):
                observed.counts[type(message).__name__] += 1
                _observe(observed, at, message)
        conn.send(observed)
    bus.stop()


def _observe(observed: Observed, at: float, message: Any) -> None:
    """Note what one job message, alone or from a batch, says about its job."""
    if isinstance(message, JobReady):
        observed.ready_seen.setdefault((message.artifact_id, message.job_id, message.attempt), at)
    elif isinstance(message, JobStarted | JobFinished):
        ref = message.job
        key = (ref.artifact_id, ref.job_id, ref.attempt)
        if isinstance(message, JobStarted):
            observed.started_at.setdefault(key, message.at)
        else:
            observed.finished_seen.setdefault(key, at)
            observed.finished_at.setdefault(key, (message.started_at, message.finished_at))
            # A quick job sends no JobStarted: its result says when it started.
            observed.started_at.setdefault(key, message.started_at)


# --- (b, c) flotta_mqtt: driving them -------------------------------------------------------


class _Cluster:
    """Worker, workbench and observer processes around a scheduler in this process."""

    def __init__(self, url: str, scratch: Path, broker_pid: int) -> None:
        self.url = url
        self.broker_pid = broker_pid
        self.store_url = f"file://{scratch}/store"
        csv = scratch / "bench.csv"
        csv.write_text("x\n1\n")
        self.stop_workers = SPAWN.Event()
        self.processes: list[Any] = []
        readies = []
        for i in range(WORKERS):
            datasets = {FAN_PROJECT: [str(csv)]}
            if i == 0:
                datasets[CHAIN_PROJECT] = [str(csv)]
            ready = SPAWN.Event()
            readies.append(ready)
            name = f"bench-w{i}"
            args = (name, url, self.store_url, datasets, ready, self.stop_workers)
            self.processes.append(SPAWN.Process(target=_worker_main, args=args, name=name))
        self.workbench, workbench_end = SPAWN.Pipe()
        self.observer, observer_end = SPAWN.Pipe()
        self.processes.append(
            SPAWN.Process(
                target=_workbench_main, args=(url, self.store_url, workbench_end), name="workbench"
            )
        )
        self.processes.append(
            SPAWN.Process(target=_observer_main, args=(url, observer_end), name="observer")
        )
        self.published: dict[Key, float] = {}
        self.job_ready_publishes = 0
        self.sent: Counter[str] = Counter()  # the scheduler's publishes by message type
        self.scheduler: SchedulerNode | None = None
        try:
            self._start(readies, scratch)
        except BaseException:
            self.close()
            raise

    def _start(self, readies: list[Any], scratch: Path) -> None:
        for process in self.processes:
            process.start()
        for ready in readies:
            if not ready.wait(60):
                raise RuntimeError("a worker process did not start")
        for conn in (self.workbench, self.observer):
            if not conn.poll(60) or conn.recv() != "ready":
                raise RuntimeError("the workbench or observer process did not start")
        # Workers are up and their presence retained before the scheduler subscribes.
        self.scheduler = SchedulerNode(
            SchedulerConfig(
                broker=BrokerSettings(url=self.url),
                storage=StorageSettings(url=self.store_url),
                database=scratch / "scheduler.db",
                worker_grace=5.0,
            )
        )
        self._stamp_dispatches(self.scheduler)
        self.scheduler.start()

    def _stamp_dispatches(self, scheduler: SchedulerNode) -> None:
        """Record when the scheduler thread hands each JobReady to its bus (first time)."""
        bus = scheduler.scheduler.bus
        publish = bus.publish

        def stamped(topic: str, message: Any, **kwargs: Any) -> None:
            if isinstance(message, JobReady):
                self.published.setdefault(
                    (message.artifact_id, message.job_id, message.attempt), time.time()
                )
                self.job_ready_publishes += 1
            self.sent[type(message).__name__] += 1
            publish(topic, message, **kwargs)

        publish_many = bus.publish_many

        def stamped_many(topic: str, messages: Any) -> None:
            for message in messages:
                if isinstance(message, JobReady):
                    self.published.setdefault(
                        (message.artifact_id, message.job_id, message.attempt), time.time()
                    )
                    self.job_ready_publishes += 1
                self.sent[type(message).__name__] += 1
            publish_many(topic, messages)

        bus.publish = stamped  # type: ignore[method-assign]
        bus.publish_many = stamped_many  # type: ignore[method-assign]

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each role's processes (Linux /proc; 0 elsewhere)."""

        def pids(prefix: str) -> list[int]:
            return [p.pid for p in self.processes if p.name.startswith(prefix)]

        roles = {
            "scheduler process": [os.getpid()],
            "4 worker processes": pids("bench-w"),
            "workbench process": pids("workbench"),
            "observer process": pids("observer"),
            "mosquitto": [self.broker_pid],
        }
        used = {role: sum(_cpu_seconds(pid) for pid in group) for role, group in roles.items()}
        return used | {"machine": _machine_cpu_seconds()}

    def submit(self, artifacts: list[Artifact]) -> dict[str, Any]:
        self.workbench.send(artifacts)
        if not self.workbench.poll(180):
            raise RuntimeError("the workbench did not answer in 180 s")
        result: dict[str, Any] = self.workbench.recv()
        return result

    def observe(self) -> Observed:
        time.sleep(0.2)  # let the last events reach the observer
        self.observer.send("collect")
        observed: Observed = self.observer.recv()
        return observed

    def reset(self) -> None:
        self.observe()
        self.published.clear()
        self.job_ready_publishes = 0
        self.sent.clear()

    def close(self) -> None:
        for conn in (self.workbench, self.observer):
            with contextlib.suppress(OSError):
                conn.send(None)
        self.stop_workers.set()
        for process in self.processes:
            if process.pid is None:
                continue  # never started
            process.join(15)
            if process.is_alive():
                process.terminate()
                process.join(5)
        if self.scheduler is not None:
            self.scheduler.stop()


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have used (busy time from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


SENT = ("JobReady", "EventAck", "LocksReleased", "ArtifactStatus")
EVENTS = ("JobAccepted", "JobStarted", "JobFinished", "JobHeartbeat")


def _check(result: dict[str, Any], jobs_each: int) -> None:
    bad = [
        (state, total, done)
        for state, total, done in zip(
            result["states"], result["totals"], result["completed"], strict=True
        )
        if state is not ArtifactState.COMPLETED or total != jobs_each or done != jobs_each
    ]
    if bad:
        raise RuntimeError(f"{len(bad)} artifacts did not complete as expected, e.g. {bad[:3]}")


def _warm_up(cluster: _Cluster) -> None:
    """Until the scheduler binds a Parallel step to all 4 workers; then a short chain."""
    for _ in range(20):
        result = cluster.submit([Artifact(project=FAN_PROJECT, steps=[Parallel(operation=NOOP)])])
        if result["totals"] == [WORKERS] and result["states"] == [ArtifactState.COMPLETED]:
            break
        time.sleep(0.5)
    else:
        raise RuntimeError("the scheduler never bound an artifact to all 4 workers")
    _check(
        cluster.submit(
            [
                Artifact(
                    project=CHAIN_PROJECT,
                    steps=[Iterate(rounds=20, steps=[Parallel(operation=NOOP)])],
                )
            ]
        ),
        20,
    )
    cluster.reset()


def _latencies(observed: Observed, start_of: dict[Key, float], ids: set[str]) -> list[float]:
    return [
        (started - start_of[key]) * 1e3
        for key, started in observed.started_at.items()
        if key[0] in ids and key in start_of
    ]


def fan_out(cluster: _Cluster, artifacts: int) -> dict[str, float]:
    batch = [
        Artifact(project=FAN_PROJECT, steps=[Parallel(operation=NOOP)]) for _ in range(artifacts)
    ]
    cpu_before = cluster.cpu()
    result = cluster.submit(batch)
    cpu = {role: used - cpu_before[role] for role, used in cluster.cpu().items()}
    _check(result, WORKERS)
    observed = cluster.observe()
    ids = {a.id for a in batch}
    jobs = artifacts * WORKERS
    dispatch = _latencies(observed, cluster.published, ids)
    seen = _latencies(observed, observed.ready_seen, ids)
    if len(dispatch) != jobs or len(seen) != jobs:
        log.warning("fan-out: matched %d and %d of %d jobs", len(dispatch), len(seen), jobs)
    figures = {
        "fan_jobs_s": jobs / (result["last"] - result["first"]),
        "fan_wall_s": result["last"] - result["first"],
        "fan_submit_s": result["submitted"] - result["first"],
        "fan_d2s_p50": percentile(dispatch, 0.5),
        "fan_d2s_p99": percentile(dispatch, 0.99),
        "fan_seen_p50": percentile(seen, 0.5),
        "fan_seen_p99": percentile(seen, 0.99),
        "fan_resent": cluster.job_ready_publishes - len(cluster.published),
    }
    figures |= {f"sent {kind}": cluster.sent[kind] / jobs for kind in SENT}
    figures |= {f"event {kind}": observed.counts[kind] / jobs for kind in EVENTS}
    figures |= {f"cpu {role}": used for role, used in cpu.items()}
    cluster.reset()
    return figures


def chain(cluster: _Cluster, rounds: int) -> dict[str, float]:
    artifact = Artifact(
        project=CHAIN_PROJECT, steps=[Iterate(rounds=rounds, steps=[Parallel(operation=NOOP)])]
    )
    result = cluster.submit([artifact])
    _check(result, rounds)
    observed = cluster.observe()
    ids = {artifact.id}
    dispatch = _latencies(observed, cluster.published, ids)
    finished = {k[1]: t for k, t in observed.finished_seen.items() if k[0] == artifact.id}
    ready = {k[1]: t for k, t in observed.ready_seen.items() if k[0] == artifact.id}
    turnaround = [(ready[j + 1] - finished[j]) * 1e3 for j in finished if j + 1 in ready]
    ran = [(end - begin) * 1e3 for begin, end in observed.finished_at.values()]
    hop = [
        (observed.finished_seen[key] - end) * 1e3
        for key, (_, end) in observed.finished_at.items()
        if key[0] == artifact.id
    ]
    if len(dispatch) != rounds or len(turnaround) != rounds - 1:
        log.warning("chain: matched %d and %d of %d links", len(dispatch), len(turnaround), rounds)
    figures = {
        "chain_ms_link": (result["last"] - result["first"]) * 1e3 / rounds,
        "chain_d2s_p50": percentile(dispatch, 0.5),
        "chain_d2s_p99": percentile(dispatch, 0.99),
        "chain_run_p50": percentile(ran, 0.5),
        "chain_hop_p50": percentile(hop, 0.5),
        "chain_turn_p50": percentile(turnaround, 0.5),
        "chain_turn_p99": percentile(turnaround, 0.99),
        "chain_resent": cluster.job_ready_publishes - len(cluster.published),
    }
    cluster.reset()
    return figures


def measure_flotta(
    url: str, broker_pid: int, scratch: Path, runs: int, artifacts: int, rounds: int
) -> list[dict[str, float]]:
    cluster = _Cluster(url, scratch, broker_pid)
    try:
        _warm_up(cluster)
        return [fan_out(cluster, artifacts) | chain(cluster, rounds) for _ in range(runs)]
    finally:
        cluster.close()


# --- report ------------------------------------------------------------------------------------


def _ratio(value: float, floor: float) -> str:
    return f"{value / floor:,.1f} x"


def report(
    floor: dict[str, float],
    ours: dict[str, float],
    runs: int,
    artifacts: int,
    rounds: int,
    count: int,
) -> None:
    jobs = artifacts * WORKERS
    ms = "{:,.2f} ms".format
    rows = [
        [
            f"fan-out: {artifacts} artifacts [Parallel(noop)] = {jobs:,} jobs, jobs/s",
            f"{ours['fan_jobs_s']:,.0f}",
            f"{floor['rate']:,.0f} echoes/s",
            _ratio(floor["rate"], ours["fan_jobs_s"]),
        ],
        [
            "fan-out: dispatch → start, p50 (2,000 ready at once, 16 slots)",
            ms(ours["fan_d2s_p50"]),
            ms(floor["rtt_p50"]),
            _ratio(ours["fan_d2s_p50"], floor["rtt_p50"]),
        ],
        [
            "fan-out: dispatch → start, p99",
            ms(ours["fan_d2s_p99"]),
            ms(floor["rtt_p99"]),
            _ratio(ours["fan_d2s_p99"], floor["rtt_p99"]),
        ],
        [
            "fan-out: observer-stamped JobReady → start, p50 (*)",
            ms(ours["fan_seen_p50"]),
            ms(floor["rtt_p50"]),
            _ratio(ours["fan_seen_p50"], floor["rtt_p50"]),
        ],
        [
            "fan-out: observer-stamped JobReady → start, p99 (*)",
            ms(ours["fan_seen_p99"]),
            ms(floor["rtt_p99"]),
            _ratio(ours["fan_seen_p99"], floor["rtt_p99"]),
        ],
        [
            f"chain: {rounds} links, ms per link",
            ms(ours["chain_ms_link"]),
            ms(floor["rtt_p50"]),
            _ratio(ours["chain_ms_link"], floor["rtt_p50"]),
        ],
        [
            "chain: dispatch → start, p50 (unloaded)",
            ms(ours["chain_d2s_p50"]),
            ms(floor["rtt_p50"]),
            _ratio(ours["chain_d2s_p50"], floor["rtt_p50"]),
        ],
        [
            "chain: dispatch → start, p99",
            ms(ours["chain_d2s_p99"]),
            ms(floor["rtt_p99"]),
            _ratio(ours["chain_d2s_p99"], floor["rtt_p99"]),
        ],
        [
            "chain: start → finished_at (noop + product put), p50",
            ms(ours["chain_run_p50"]),
            "",
            "",
        ],
        [
            "chain: JobFinished.finished_at → observer saw it, p50",
            ms(ours["chain_hop_p50"]),
            ms(floor["rtt_p50"]),
            _ratio(ours["chain_hop_p50"], floor["rtt_p50"]),
        ],
        [
            "chain: JobFinished seen → next JobReady seen, p50",
            ms(ours["chain_turn_p50"]),
            ms(floor["rtt_p50"]),
            _ratio(ours["chain_turn_p50"], floor["rtt_p50"]),
        ],
        [
            "chain: JobFinished seen → next JobReady seen, p99",
            ms(ours["chain_turn_p99"]),
            ms(floor["rtt_p99"]),
            _ratio(ours["chain_turn_p99"], floor["rtt_p99"]),
        ],
    ]
    print_table(
        f"dispatch: scheduler + {WORKERS} worker processes (max_jobs={MAX_JOBS}) on mosquitto, "
        f"median of {runs} run(s); {machine_load()}",
        ["figure", "flotta_mqtt", "raw MQTT floor", "cost vs floor"],
        rows,
        note=(
            f"floor: paho v5 QoS 1 + TCP_NODELAY, echo in another process; round trip over "
            f"{count} sequential messages; echoes/s with ≤{FLOOR_WINDOW} in flight. "
            f"cost vs floor: flotta time ÷ floor time, or floor rate ÷ flotta rate.\n"
            f"(*) the observer is a process like the others: when the CPUs are saturated its "
            f"stamps lag (it can stamp a JobReady after the job started).\n"
            f"fan-out wall {ours['fan_wall_s']:.2f} s (submitting took "
            f"{ours['fan_submit_s']:.2f} s); JobReady re-sent: fan-out "
            f"{ours['fan_resent']:.0f}, chain {ours['chain_resent']:.0f}."
        ),
    )


def report_costs(ours: dict[str, float], runs: int, artifacts: int) -> None:
    jobs = artifacts * WORKERS
    wall = ours["fan_wall_s"]
    rows = [[f"scheduler sends {kind}", f"{ours[f'sent {kind}']:.2f}"] for kind in SENT]
    rows += [[f"workers send {kind}", f"{ours[f'event {kind}']:.2f}"] for kind in EVENTS]
    cpu = {key[4:]: value for key, value in ours.items() if key.startswith("cpu ")}
    machine = cpu.pop("machine")
    rows += [
        [f"CPU: {role}", f"{used * 1e3 / jobs:.2f} ms ({used:.2f} s, {used / wall:.0%} of a core)"]
        for role, used in cpu.items()
    ]
    total = sum(cpu.values())
    rows.append(
        ["CPU: all of the above", f"{total * 1e3 / jobs:.2f} ms ({total / wall:.0%} of a core)"]
    )
    rows.append(
        [
            "CPU: whole machine busy (any process)",
            f"{machine / wall:.0%} of a core; not ours: {(machine - total) / wall:.0%}",
        ]
    )
    print_table(
        f"fan-out cost per job ({jobs:,} jobs in {wall:.2f} s on {os.cpu_count()} cores), "
        f"median of {runs} run(s)",
        ["per job", "value"],
        rows,
        note="messages counted at the scheduler's bus.publish and by the observer; CPU from /proc.",
    )


def run(runs: int = 1, artifacts: int = 500, rounds: int = 300, count: int = 500) -> None:
    logging.basicConfig(level=logging.WARNING, format="[main] %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="flotta-bench-") as scratch, LocalBroker() as broker:
        assert broker.process is not None
        floor = median_of_runs(measure_floor(broker.host, broker.port, runs, count))
        ours = median_of_runs(
            measure_flotta(broker.url, broker.process.pid, Path(scratch), runs, artifacts, rounds)
        )
    report(floor, ours, runs, artifacts, rounds, count)
    report_costs(ours, runs, artifacts)


if __name__ == "__main__":
    run()
