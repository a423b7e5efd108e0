"""A job's life beyond the happy path, in one process on a real mosquitto: retries with
backoff, timeouts, deadlines, cancellation, a result kept through a broker outage and a
worker restart, tampered products, heartbeats, late results of abandoned attempts, and
deadlines and timeouts across a scheduler restart.

The operations come from tests/plugins/test_ops.py: `flaky` fails its first attempts and
records when each ran; `linger` runs until told (a flag file) or cancelled and writes down
what it saw. Intervals are small so each test takes a second or two; nothing sleeps to
synchronise (a sleeping operation is the workload): tests wait on retained statuses,
MessageRecorders, or poll files with the bounded `wait_for`.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import select
import socket
import sqlite3
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import MessageRecorder, messages_of, wait_for

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import ArtifactFailed, ArtifactHandle, Client
from flotta_mqtt.logs import configure_logging
from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    Collect,
    Finalize,
    JobRole,
    JobState,
    Operation,
    Parallel,
    Task,
    Tasks,
)
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import (
    ArtifactStatus,
    CancelJob,
    EventAck,
    JobFailed,
    JobFinished,
    JobHeartbeat,
    JobReady,
    JobRef,
    JobStarted,
    RemoteError,
    Resource,
    topics,
)
from flotta_mqtt.scheduler.config import TICK, SchedulerConfig
from flotta_mqtt.transport import store as store_module
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import ResourceStore, sha256_hex
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

PLUGIN = "tests.plugins.test_ops"
PROJECT = "demo"
ROWS = {"w0": 17, "w1": 29}
TIMEOUT = 20.0  # generous: the machine running the suite may be busy
INITIATOR = "scheduler.initiator"

# Fast timers: re-sends, retries and heartbeats in tenths of a second.
SCHEDULER = {"resend_interval": 0.5, "retry_backoff": 0.05, "retry_backoff_max": 1.0}
WORKER = {"resend_interval": 0.5, "heartbeat_interval": 0.2}


# --- in-process nodes ------------------------------------------------------------------------


@dataclass
class Nodes:
    """A scheduler, workers and a workbench on one broker and store; all stopped at the end."""

    broker_url: str
    folder: Path
    running: list[SchedulerNode | WorkerAgent | Client] = field(default_factory=list)
    buses: list[Bus] = field(default_factory=list)

    @property
    def broker(self) -> BrokerSettings:
        return BrokerSettings(url=self.broker_url)

    @property
    def storage(self) -> StorageSettings:
        return StorageSettings(url=(self.folder / "store").as_uri())

    @property
    def database(self) -> Path:
        return self.folder / "scheduler.db"

    def path(self, name: str) -> Path:
        """A file for an operation to write or wait for (unique in this test)."""
        return self.folder / name

    def scheduler(self, **settings: Any) -> SchedulerNode:
        config = SchedulerConfig(
            broker=self.broker,
            storage=self.storage,
            database=self.database,
            initiator_plugins=[PLUGIN],
            **{**SCHEDULER, **settings},
        )
        node = SchedulerNode(config).start(wait=TIMEOUT)
        self.running.append(node)
        return node

    def worker_config(self, name: str, **settings: Any) -> WorkerConfig:
        data = self.folder / f"{name}.csv"
        if not data.exists():
            data.write_text("x\n" + "".join(f"{i / ROWS[name]!r}\n" for i in range(ROWS[name])))
        return WorkerConfig(
            name=name,
            broker=self.broker,
            storage=self.storage,
            datasets={PROJECT: {"paths": [data], "privacy": {"exact": True}}},
            plugins=[PLUGIN],
            **{**WORKER, **settings},
        )

    def worker(self, name: str, wait: float | None = TIMEOUT, **settings: Any) -> WorkerAgent:
        node = WorkerAgent(self.worker_config(name, **settings)).start(wait=wait)
        self.running.append(node)
        return node

    def client(self) -> Client:
        client = Client(self.broker, storage=self.storage, resend_interval=1.0)
        self.running.append(client)
        return client

    def start(
        self, *workers: str, scheduler: dict[str, Any] | None = None, **worker_settings: Any
    ) -> tuple[SchedulerNode, list[WorkerAgent], Client]:
        """A scheduler, these workers, and a workbench that has seen them all online."""
        node = self.scheduler(**(scheduler or {}))
        agents = [self.worker(name, **worker_settings) for name in workers]
        client = self.client()
        wait_online(client, [*workers, node.config.initiator])
        return node, agents, client

    def observer(self, subscriptions: list[str], recorder: MessageRecorder) -> Bus:
        """A bare bus client that records what it sees and publishes what a test forges."""
        bus = Bus(
            client_id=f"observer-{uuid.uuid4().hex[:8]}",
            settings=BrokerSettings(url=self.broker_url),
            on_message=recorder,
            subscriptions=subscriptions,
            clean=True,
        ).start(wait=TIMEOUT)
        self.buses.append(bus)
        return bus

    def stop(self, node: SchedulerNode | WorkerAgent | Client) -> None:
        self.running.remove(node)
        if isinstance(node, Client):
            node.close()
        else:
            node.stop()

    def close(self) -> None:
        for bus in self.buses:
            bus.stop()
        for node in reversed(list(self.running)):
            self.stop(node)


@pytest.fixture
def nodes(broker: LocalBroker, tmp_path: Path) -> Iterator[Nodes]:
    cluster = Nodes(broker.url, tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


def wait_online(client: Client, names: list[str]) -> None:
    wait_for(
        lambda: set(names) <= {p.node for p in client.workers(timeout=TIMEOUT) if p.online},
        timeout=TIMEOUT,
        message=f"nodes {names} not all online",
    )


def wait_status(
    handle: ArtifactHandle, predicate: Callable[[ArtifactStatus], bool], what: str
) -> ArtifactStatus:
    def settled() -> bool:
        status = handle.status()
        return status is not None and predicate(status)

    wait_for(settled, timeout=TIMEOUT, message=f"artifact {handle.artifact_id} never {what}")
    status = handle.status()
    assert status is not None
    return status


def failure(handle: ArtifactHandle) -> ArtifactFailed:
    with pytest.raises(ArtifactFailed) as caught:
        handle.result(timeout=TIMEOUT)
    return caught.value


def job_rows(database: Path, artifact_id: str) -> list[tuple[int, str, int]]:
    """(job id, state, attempt) of every job, as the scheduler committed them."""
    with sqlite3.connect(database) as db:
        return db.execute(
            "SELECT job_id, state, attempt FROM jobs WHERE artifact_id = ? ORDER BY job_id",
            (artifact_id,),
        ).fetchall()


def lines(path: Path) -> list[list[str]]:
    """The whitespace-split lines of a file an operation appends to (none if absent)."""
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def noted(path: Path, count: int, what: str) -> list[list[str]]:
    """Wait until an operation has written `count` lines to `path`; return them."""
    wait_for(lambda: len(lines(path)) >= count, timeout=TIMEOUT, message=f"{what}: {path}")
    return lines(path)


def operation(name: str, **params: Any) -> Operation:
    """An Operation whose Path parameters are passed as strings."""
    return Operation(
        name=name, params={k: str(v) if isinstance(v, Path) else v for k, v in params.items()}
    )


def linger(**params: Any) -> Operation:
    return operation("linger", **params)


def flaky(**params: Any) -> Operation:
    return operation("flaky", **params)


# --- 1: retries ------------------------------------------------------------------------------


def test_a_failing_job_is_retried_until_an_attempt_succeeds(nodes: Nodes) -> None:
    _, _, client = nodes.start("w0")
    counter = nodes.path("attempts")
    artifact = Artifact(
        project=PROJECT, steps=[Parallel(flaky(counter=counter, failures=2), retries=2)]
    )
    assert client.submit(artifact).result(timeout=TIMEOUT) == 1
    assert [(node, attempt) for _, node, _, attempt in lines(counter)] == [
        ("w0", "1"),
        ("w0", "2"),
        ("w0", "3"),
    ]
    assert job_rows(nodes.database, artifact.id) == [(0, JobState.COMPLETED, 3)]


def test_a_job_out_of_retries_fails_the_artifact_with_its_last_error(nodes: Nodes) -> None:
    _, _, client = nodes.start("w0")
    counter = nodes.path("attempts")
    artifact = Artifact(
        project=PROJECT,
        steps=[
            Parallel(flaky(counter=counter, failures=3), Collect(), retries=1),
            Finalize(Operation(name="count")),
        ],
    )
    failed = failure(client.submit(artifact))
    assert failed.status.state is ArtifactState.FAILED
    assert failed.status.failed_job == 0
    assert failed.remote.type == "FlakyError"
    assert failed.remote.message == "flaky: failure 2 of 3"  # the last attempt's error
    assert "_flaky" in failed.remote.traceback
    assert failed.status.counts == {JobState.FAILED: 1, JobState.CANCELLED: 1}
    assert len(lines(counter)) == 2  # one retry, then no more
    assert job_rows(nodes.database, artifact.id) == [
        (0, JobState.FAILED, 2),
        (1, JobState.CANCELLED, 0),
    ]


def test_retry_backoff_grows_with_jitter_and_stays_under_its_maximum(nodes: Nodes) -> None:
    base, most = 0.3, 1.5
    _, _, client = nodes.start("w0", scheduler={"retry_backoff": base, "retry_backoff_max": most})
    counter = nodes.path("attempts")
    artifact = Artifact(
        project=PROJECT, steps=[Parallel(flaky(counter=counter, failures=4), retries=4)]
    )
    assert client.submit(artifact).result(timeout=TIMEOUT) == 1
    assert job_rows(nodes.database, artifact.id) == [(0, JobState.COMPLETED, 5)]

    started = [float(at) for at, *_ in lines(counter)]
    gaps = [b - a for a, b in itertools.pairwise(started)]
    # Retry n waits min(max, base * 2**(n-1)) * uniform(0.5, 1), then up to one scheduler
    # tick, plus a round trip over the broker (slack, loose for a busy machine).
    nominal = [min(most, base * 2**n) for n in range(len(gaps))]  # 0.3, 0.6, 1.2, 1.5
    slack = 0.5
    for n, (gap, delay) in enumerate(zip(gaps, nominal, strict=True), start=1):
        assert gap >= 0.5 * delay - 0.01, f"retry {n} came after {gap:.3f} s: {gaps}"
        assert gap <= delay + TICK + slack, f"retry {n} came after {gap:.3f} s: {gaps}"
    # Growing: the last wait is longer than the first whatever the jitter (0.75 > 0.55),
    # and none is much shorter than the one before it.
    assert gaps[-1] > gaps[0], gaps
    assert all(b > a - TICK - 0.2 for a, b in itertools.pairwise(gaps)), gaps
    # Capped: uncapped, the fourth wait would be 1.2-2.4 s.
    assert gaps[-1] <= most + TICK + slack, gaps


# --- 2: job timeout --------------------------------------------------------------------------


def test_a_job_over_its_timeout_is_cancelled_and_fails_the_artifact(nodes: Nodes) -> None:
    _, _, client = nodes.start("w0")
    control = MessageRecorder()
    nodes.observer([topics.control("w0")], control)
    marker = nodes.path("cancelled")
    artifact = Artifact(
        project=PROJECT, steps=[Parallel(linger(seconds=30, marker=marker), timeout=0.5)]
    )
    began = time.monotonic()
    failed = failure(client.submit(artifact))
    took = time.monotonic() - began
    assert 0.5 <= took < 10.0  # stopped long before the 30 s the operation wanted
    assert failed.status.state is ArtifactState.FAILED
    assert failed.status.failed_job == 0
    assert failed.remote.type == "TimeoutError"
    assert "ran over its timeout of 0.5 s" in failed.remote.message
    assert job_rows(nodes.database, artifact.id) == [(0, JobState.FAILED, 1)]

    # The worker was told to stop that attempt, and the operation saw it and returned.
    ref = JobRef(artifact_id=artifact.id, job_id=0, attempt=1)
    control.wait_for(
        lambda _: any(m.job == ref for m in messages_of(control.messages, CancelJob)),
        timeout=TIMEOUT,
        message="the worker was never told to cancel the job",
    )
    assert noted(marker, 1, "the operation never saw the cancellation") == [
        ["w0", artifact.id, "0", "1"]
    ]


def test_a_job_over_its_timeout_is_retried_when_it_has_retries(nodes: Nodes) -> None:
    _, _, client = nodes.start("w0")
    control = MessageRecorder()
    nodes.observer([topics.control("w0")], control)
    ledger, marker = nodes.path("ledger"), nodes.path("cancelled")
    # Only the first attempt lingers; the second returns at once.
    operation = linger(seconds=30, attempts=1, ledger=ledger, marker=marker)
    artifact = Artifact(project=PROJECT, steps=[Parallel(operation, timeout=0.5, retries=1)])
    assert client.submit(artifact).result(timeout=TIMEOUT) == 1
    assert job_rows(nodes.database, artifact.id) == [(0, JobState.COMPLETED, 2)]
    assert lines(ledger) == [["w0", artifact.id, "0", "1"], ["w0", artifact.id, "0", "2"]]
    assert noted(marker, 1, "attempt 1 never saw its cancellation") == [
        ["w0", artifact.id, "0", "1"]
    ]
    cancels = messages_of(control.messages, CancelJob)
    assert [m.job.attempt for m in cancels] == [1]


# --- 3: artifact deadline --------------------------------------------------------------------


def test_an_artifact_past_its_deadline_fails_and_its_jobs_stop(nodes: Nodes) -> None:
    _, _, client = nodes.start("w0")
    marker = nodes.path("cancelled")
    artifact = Artifact(
        project=PROJECT,
        deadline=1.0,
        steps=[
            Parallel(linger(seconds=30, marker=marker), Collect()),
            Finalize(Operation(name="count")),
        ],
    )
    began = time.monotonic()
    failed = failure(client.submit(artifact))
    took = time.monotonic() - began
    assert 1.0 <= took < 10.0
    assert failed.status.state is ArtifactState.FAILED
    assert failed.remote.type == "DeadlineExceeded"
    assert "deadline of 1.0 s" in failed.remote.message
    assert failed.status.counts == {JobState.CANCELLED: 2}
    assert noted(marker, 1, "the running job never saw the cancellation") == [
        ["w0", artifact.id, "0", "1"]
    ]


def restart_scheduler(
    nodes: Nodes, scheduler: SchedulerNode, handle: ArtifactHandle
) -> SchedulerNode:
    """Stop the scheduler and start it again on its database; wait until it has resumed."""
    before = handle.fetch_status(timeout=TIMEOUT)
    assert before is not None
    nodes.stop(scheduler)
    restarted = nodes.scheduler()
    # A resumed artifact's status is announced again, with a higher seq.
    wait_status(handle, lambda s: s.seq > before.seq, "was resumed")
    return restarted


def test_a_deadline_counts_from_submission_across_a_scheduler_restart(nodes: Nodes) -> None:
    scheduler, _, client = nodes.start("w0")
    ledger = nodes.path("ledger")
    # The job takes 3 s, so the restarted scheduler checks the deadline a few times first.
    artifact = Artifact(
        project=PROJECT, deadline=60.0, steps=[Parallel(linger(seconds=3.0, ledger=ledger))]
    )
    handle = client.submit(artifact)
    noted(ledger, 1, "the job never started")
    restart_scheduler(nodes, scheduler, handle)
    assert handle.result(timeout=TIMEOUT) == 1  # not DeadlineExceeded: 60 s have not passed


def test_a_job_timeout_still_applies_after_a_scheduler_restart(nodes: Nodes) -> None:
    scheduler, _, client = nodes.start("w0")
    ledger, marker = nodes.path("ledger"), nodes.path("cancelled")
    operation = linger(seconds=4, ledger=ledger, marker=marker)
    artifact = Artifact(project=PROJECT, steps=[Parallel(operation, timeout=1.0)])
    handle = client.submit(artifact)
    noted(ledger, 1, "the job never started")
    restart_scheduler(nodes, scheduler, handle)
    failed = failure(handle)  # about 1 s after the restart, not after the full 4 s
    assert failed.remote.type == "TimeoutError"
    assert noted(marker, 1, "the job was never cancelled") == [["w0", artifact.id, "0", "1"]]


# --- 4: cancel -------------------------------------------------------------------------------


def test_cancel_stops_running_jobs_frees_their_workers_and_ignores_late_results(
    nodes: Nodes,
) -> None:
    # w0 runs one job at a time: a job that kept running after the cancel would hold it.
    _, _, client = nodes.start("w0", "w1", max_jobs=1)
    events, control = MessageRecorder(), MessageRecorder()
    forger = nodes.observer([topics.ALL_EVENTS], events)
    nodes.observer([topics.control("w0"), topics.control("w1")], control)
    ledger, marker = nodes.path("ledger"), nodes.path("cancelled")
    artifact = Artifact(
        project=PROJECT,
        steps=[
            Parallel(linger(seconds=60, ledger=ledger, marker=marker), Collect()),
            Finalize(Operation(name="count")),
        ],
    )
    handle = client.submit(artifact)
    noted(ledger, 2, "the jobs on w0 and w1 never started")
    client.cancel(artifact.id)
    status = handle.wait(timeout=TIMEOUT)
    assert status.state is ArtifactState.CANCELLED
    assert status.counts == {JobState.CANCELLED: 3}  # the two running and the waiting one
    assert status.error is not None and status.error.type == "Cancelled"

    # Each running job's operation saw its cancellation (and so returned).
    seen = noted(marker, 2, "the running jobs never saw the cancellation")
    assert sorted(seen) == [["w0", artifact.id, "0", "1"], ["w1", artifact.id, "1", "1"]]
    # w0's only runner is free again: another artifact runs on it at once.
    count = client.submit(
        Artifact(
            project=PROJECT,
            steps=[Parallel(Operation(name="count"), Collect()), Finalize(Operation(name="count"))],
        )
    )
    assert count.result(timeout=TIMEOUT) == sum(ROWS.values())

    # A result for a cancelled job arriving late is acknowledged and changes nothing.
    store = ResourceStore(nodes.storage.url)
    product = store.put_product(artifact.id, "0", 1, b"1000")
    ref = JobRef(artifact_id=artifact.id, job_id=0, attempt=1)
    now = time.time()
    forger.publish(
        topics.events("w0"), JobFinished(job=ref, product=product, started_at=now, finished_at=now)
    )
    control.wait_for(
        lambda _: any(ref in ack.jobs for ack in messages_of(control.messages, EventAck)),
        timeout=TIMEOUT,
        message="the late result was never acknowledged",
    )
    after = handle.fetch_status(timeout=TIMEOUT)
    assert after == status  # same state, counts and seq: nothing was announced
    assert job_rows(nodes.database, artifact.id) == [
        (job, JobState.CANCELLED, attempt) for job, attempt in ((0, 1), (1, 1), (2, 0))
    ]
    # The workers themselves sent no result for the cancelled jobs: only the forged one.
    finals = messages_of(
        events.messages, JobFinished | JobFailed, lambda m: m.job.artifact_id == artifact.id
    )
    assert [m.job for m in finals] == [ref]


def test_a_long_job_on_an_idle_worker_is_announced_and_the_next_job_runs_beside_it(
    nodes: Nodes,
) -> None:
    """A job still running a moment after it started is announced, and the worker reads,
    runs and reports the next job on another runner while the first still runs."""
    _, _, client = nodes.start("w0", max_jobs=2)
    events = MessageRecorder()
    nodes.observer([topics.events("w0")], events)
    flag, ledger = nodes.path("go"), nodes.path("ledger")
    long = Artifact(project=PROJECT, steps=[Parallel(linger(flag=flag, ledger=ledger))])
    held = client.submit(long)
    noted(ledger, 1, "the long job never started")
    events.wait_for(
        lambda messages: bool(
            messages_of(messages, JobStarted, lambda m: m.job.artifact_id == long.id)
        ),
        timeout=TIMEOUT,
        message="the long job was never announced",
    )

    quick = client.submit(Artifact(project=PROJECT, steps=[Parallel(Operation(name="count"))]))
    assert quick.result(timeout=TIMEOUT) == [ROWS["w0"]]  # one result per worker
    status = held.status()
    assert status is not None and status.counts == {JobState.RUNNING: 1}
    flag.touch()
    assert held.result(timeout=TIMEOUT) == 1


# --- 5: store and forward --------------------------------------------------------------------


def test_a_result_made_while_the_broker_is_down_survives_a_worker_restart(
    nodes: Nodes, broker: LocalBroker
) -> None:
    state = nodes.path("w0-state")
    _, (w0,), client = nodes.start("w0", state_dir=state)
    flag, ledger = nodes.path("go"), nodes.path("ledger")
    artifact = Artifact(
        project=PROJECT,
        steps=[
            Parallel(linger(flag=flag, ledger=ledger), Collect()),
            Finalize(Operation(name="slow")),
        ],
    )
    handle = client.submit(artifact)
    noted(ledger, 1, "the job never started")

    broker.stop()
    flag.touch()  # the job finishes while nobody can hear about it
    wait_for(
        lambda: any(held.final is not None for held in w0.journal.held()),
        timeout=TIMEOUT,
        message="the finished job was never journaled",
    )
    (held,) = w0.journal.held()
    assert isinstance(held.final, JobFinished) and held.final.job.attempt == 1
    # The worker crashes: whatever its MQTT client still queued is lost with it.
    w0.bus.kill()
    nodes.stop(w0)  # reaps its threads; the goodbye cannot be sent and must not hang
    # It comes back with the same name and state directory, before the broker does.
    restarted = nodes.worker("w0", wait=None, state_dir=state)
    broker.start()

    assert handle.result(timeout=TIMEOUT) == 1
    assert len(lines(ledger)) == 1  # the job ran once: its journaled result was re-sent
    assert job_rows(nodes.database, artifact.id) == [
        (0, JobState.COMPLETED, 1),
        (1, JobState.COMPLETED, 1),
    ]
    # Acknowledged, so the restarted worker forgets it.
    wait_for(lambda: not restarted.journal.held(), timeout=TIMEOUT, message="never acknowledged")


def lone_job(job_id: int, ledger: Path, **linger_params: Any) -> JobReady:
    """A JobReady as the scheduler would send it to w0, for a `linger` job."""
    return JobReady(
        artifact_id="lone",
        job_id=job_id,
        attempt=1,
        project=PROJECT,
        seed=0,
        step="0",
        kind="steps",
        role=JobRole.LOCAL,
        iteration=0,
        operation=linger(ledger=ledger, **linger_params),
    )


def finished(events: MessageRecorder, job_id: int) -> None:
    events.wait_for(
        lambda messages: bool(
            messages_of(
                messages,
                JobFinished,
                lambda m: m.job == JobRef(artifact_id="lone", job_id=job_id, attempt=1),
            )
        ),
        timeout=TIMEOUT,
        message=f"job {job_id} never finished",
    )


def test_a_job_cut_off_before_its_journal_commit_is_delivered_again_by_the_broker(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker acknowledges a JobReady only once the job is journaled: a worker that
    dies before the commit gets the job again from the broker (no scheduler here asks
    again), even on a new machine with an empty journal."""
    w0 = nodes.worker("w0", state_dir=nodes.path("w0-state"))

    def crash(ready: JobReady) -> None:
        w0.bus.kill()  # the machine dies before the commit: nothing was acknowledged
        raise OSError("the machine is gone")

    monkeypatch.setattr(w0.journal, "hold", crash)
    events = MessageRecorder()
    scheduler = nodes.observer([topics.events("w0")], events)
    ledger = nodes.path("ledger")
    scheduler.publish(topics.jobs("w0"), lone_job(0, ledger, seconds=0))
    wait_for(lambda: not w0.bus.connected.is_set(), timeout=TIMEOUT, message="never crashed")
    nodes.stop(w0)  # reaps its threads; what it does now reaches nobody
    nodes.worker("w0", state_dir=nodes.path("w0-new-machine"))
    finished(events, 0)  # from the new machine: the first one's connection is gone
    # The first machine may have started it too (it was queued before the commit).
    assert lines(ledger)[-1] == ["w0", "lone", "0", "1"]


def test_a_running_job_is_journaled_and_acknowledged(nodes: Nodes) -> None:
    """A job is journaled as it starts, then its JobReady is acknowledged: a worker that
    restarts does not get it again (and runs it once); its result joins it in the journal."""
    w0 = nodes.worker("w0", state_dir=nodes.path("w0-state"))
    events = MessageRecorder()
    scheduler = nodes.observer([topics.events("w0")], events)
    flag, ledger = nodes.path("go"), nodes.path("ledger")
    scheduler.publish(topics.jobs("w0"), lone_job(0, ledger, flag=flag))
    noted(ledger, 1, "the job never started")
    wait_for(
        lambda: [(h.job.job_id, h.final) for h in w0.journal.held()] == [(0, None)],
        timeout=TIMEOUT,
        message="the running job was never journaled",
    )
    flag.touch()
    finished(events, 0)
    # The result joins the job's row (written once the result is on its way).
    wait_for(
        lambda: [(h.job.job_id, type(h.final)) for h in w0.journal.held()] == [(0, JobFinished)],
        timeout=TIMEOUT,
        message="the result was never journaled",
    )

    nodes.stop(w0)
    nodes.worker("w0", state_dir=nodes.path("w0-new-machine"))
    # A marker: whatever the broker delivers again comes before it.
    scheduler.publish(topics.jobs("w0"), lone_job(1, ledger, seconds=0))
    finished(events, 1)
    assert lines(ledger) == [["w0", "lone", "0", "1"], ["w0", "lone", "1", "1"]]


# --- 6: resource integrity -------------------------------------------------------------------


def test_a_tampered_product_fails_its_consumer_with_the_sha256_mismatch(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "INLINE_BYTES", -1)  # every product goes to the store
    _, _, client = nodes.start("w0", "w1")
    flag = nodes.path("go")
    # Job 0 (w0) finishes at once; job 1 (w1) waits for the flag; job 2 consumes both.
    artifact = Artifact(
        project=PROJECT,
        steps=[
            Parallel(linger(flag=flag, nodes=["w1"]), Collect()),
            Finalize(Operation(name="slow")),
        ],
    )
    handle = client.submit(artifact)
    wait_status(handle, lambda s: s.counts.get(JobState.COMPLETED, 0) == 1, "finished job 0")
    store = ResourceStore(nodes.storage.url)
    url = store.product_url(artifact.id, "0", 1)
    original = store.get_bytes(url)
    assert json.loads(original) == 1
    store.put(url, b"9")  # someone rewrites job 0's product in the store
    flag.touch()

    failed = failure(handle)
    assert failed.status.state is ArtifactState.FAILED
    assert failed.status.failed_job == 2
    assert failed.remote.type == "IntegrityError"
    assert failed.remote.message == (
        f"sha256 mismatch for {url}: expected {sha256_hex(original)}, got {sha256_hex(b'9')}"
    )
    assert job_rows(nodes.database, artifact.id) == [
        (0, JobState.COMPLETED, 1),
        (1, JobState.COMPLETED, 1),
        (2, JobState.FAILED, 1),
    ]


@pytest.mark.parametrize("place", ["http", "file", "device"])
def test_a_product_url_outside_the_store_is_refused_without_opening_it(
    nodes: Nodes, place: str
) -> None:
    """A worker (any client holding its identity) reports a product anywhere it likes; the
    initiator consuming it refuses the URL, so no request, local file or device is read."""
    _, _, client = nodes.start("w0", "w1")
    ledger, flag = nodes.path("ledger"), nodes.path("go")
    artifact = Artifact(
        project=PROJECT,
        steps=[Parallel(linger(ledger=ledger, flag=flag), Collect()), Finalize(operation("slow"))],
    )
    with socket.create_server(("127.0.0.1", 0)) as listening:
        url, data = {
            "http": (f"http://127.0.0.1:{listening.getsockname()[1]}/x", b"1"),
            "file": ("file:///etc/passwd", Path("/etc/passwd").read_bytes()),
            "device": ("/dev/zero", bytes(10)),
        }[place]
        # Its true size and sha256: nothing but the URL check stands in the way.
        forged = Resource(url=url, sha256=sha256_hex(data), size=len(data))
        handle = client.submit(artifact)
        noted(ledger, 2, "the jobs on w0 and w1 never started")
        forger = nodes.observer([], MessageRecorder())
        now = time.time()
        ref = JobRef(artifact_id=artifact.id, job_id=0, attempt=1)  # job 0 is w0's
        forger.publish(
            topics.events("w0"),
            JobFinished(job=ref, product=forged, started_at=now, finished_at=now),
        )
        wait_status(handle, lambda s: s.counts.get(JobState.COMPLETED, 0) == 1, "took it")
        flag.touch()

        failed = failure(handle)
        assert select.select([listening], [], [], 0)[0] == [], "a connection came in"
    assert failed.status.failed_job == 2  # the initiator's job, consuming the forged product
    assert failed.remote.type == "ResourceRefused"
    assert failed.remote.message == (
        f"refused {url}: not a key under {ResourceStore(nodes.storage.url).root}"
        f"/artifacts/{artifact.id}"
    )


# --- 7: heartbeats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "resend"),
    [
        pytest.param(0.2, 0.5, id="heartbeat-0.2s"),
        pytest.param(
            0.6,
            0.2,
            id="heartbeat-0.6s-resend-0.2s",
        ),
    ],
)
def test_a_running_job_sends_heartbeats_at_the_configured_interval(
    nodes: Nodes, interval: float, resend: float
) -> None:
    _, _, client = nodes.start("w0", heartbeat_interval=interval, resend_interval=resend)
    events = MessageRecorder()
    nodes.observer([topics.events("w0")], events)
    flag = nodes.path("go")
    artifact = Artifact(project=PROJECT, steps=[Parallel(linger(flag=flag))])
    handle = client.submit(artifact)
    ref = JobRef(artifact_id=artifact.id, job_id=0, attempt=1)

    def beats() -> list[JobHeartbeat]:
        return messages_of(events.messages, JobHeartbeat, lambda m: ref in m.jobs)

    events.wait_for(lambda _: len(beats()) >= 4, timeout=TIMEOUT, message="too few heartbeats")
    flag.touch()
    assert handle.result(timeout=TIMEOUT) == 1
    seen = beats()[:4]
    assert all(beat.jobs == [ref] for beat in seen)  # only the running attempt
    started = messages_of(events.messages, JobStarted, lambda m: m.job == ref)
    assert started and started[0].at <= seen[0].at
    gaps = [b.at - a.at for a, b in itertools.pairwise(seen)]
    assert 0.6 * interval <= statistics.median(gaps) <= interval + 0.4, gaps


@pytest.mark.parametrize(
    "resend",
    [
        pytest.param(0.5, id="resend-0.5s"),
        pytest.param(
            5.0,
            id="resend-default",
        ),
    ],
)
def test_an_initiator_job_longer_than_the_heartbeat_grace_is_not_lost(
    nodes: Nodes, resend: float
) -> None:
    # Heartbeats are what keep a relocatable (initiator) job alive past heartbeat_grace.
    _, _, client = nodes.start("w0", scheduler={"heartbeat_grace": 1.0, "resend_interval": resend})
    ledger = nodes.path("ledger")
    artifact = Artifact(
        project=PROJECT,
        steps=[
            Parallel(linger(seconds=0), Collect()),
            Finalize(linger(seconds=2.5, ledger=ledger, quiet=True)),
        ],
    )
    assert client.submit(artifact).result(timeout=TIMEOUT) == 1
    assert lines(ledger) == [[INITIATOR, artifact.id, "1", "1"]]  # one attempt, not moved


# --- 8: late results of abandoned attempts ---------------------------------------------------


def test_a_late_result_of_an_abandoned_attempt_is_ignored(nodes: Nodes) -> None:
    _, _, client = nodes.start("w0")
    events, control = MessageRecorder(), MessageRecorder()
    forger = nodes.observer([topics.events("w0")], events)
    nodes.observer([topics.control("w0")], control)
    counter, flag = nodes.path("attempts"), nodes.path("go")
    # Attempt 1 fails; attempt 2 waits for the flag, then produces 1.
    artifact = Artifact(
        project=PROJECT,
        steps=[
            Parallel(flaky(counter=counter, failures=1, flag=flag), Collect(), retries=1),
            Finalize(Operation(name="slow")),
        ],
    )
    handle = client.submit(artifact)
    events.wait_for(
        lambda _: messages_of(events.messages, JobStarted, lambda m: m.job.attempt == 2),
        timeout=TIMEOUT,
        message="attempt 2 never started",
    )

    # Attempt 1's result turns up now, as if delayed: a product that would change the result.
    store = ResourceStore(nodes.storage.url)
    product = store.put_product(artifact.id, "0", 1, b"1000")
    stale = JobRef(artifact_id=artifact.id, job_id=0, attempt=1)
    now = time.time()
    forger.publish(topics.events("w0"), JobStarted(job=stale, at=now))
    forger.publish(
        topics.events("w0"),
        JobFailed(job=stale, error=RemoteError(type="Late", message="x"), finished_at=now),
    )
    forger.publish(
        topics.events("w0"),
        JobFinished(job=stale, product=product, started_at=now, finished_at=now),
    )
    control.wait_for(
        lambda _: (
            sum(ack.jobs.count(stale) for ack in messages_of(control.messages, EventAck)) >= 3
        ),
        timeout=TIMEOUT,
        message="the late results were never acknowledged",
    )  # one for the real failure of attempt 1, one per forged result (acks come in batches)
    during = handle.fetch_status(timeout=TIMEOUT)
    assert during is not None and during.state is ArtifactState.RUNNING
    assert during.counts.get(JobState.COMPLETED, 0) == 0
    assert job_rows(nodes.database, artifact.id)[0] == (0, JobState.RUNNING, 2)

    flag.touch()
    assert handle.result(timeout=TIMEOUT) == 1  # attempt 2's product, not the forged 1000
    assert job_rows(nodes.database, artifact.id) == [
        (0, JobState.COMPLETED, 2),
        (1, JobState.COMPLETED, 1),
    ]
    status = handle.wait(timeout=TIMEOUT)
    assert status.jobs is not None
    assert status.results == [status.jobs[1].product]  # the final job's own product


def test_json_logs_carry_the_artifact_and_job_on_every_line(nodes: Nodes) -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", "json", stream=stream)
    try:
        _, _, client = nodes.start("w0")
        flaky = Operation(name="flaky", params={"counter": str(nodes.path("n")), "failures": 1})
        artifact = Artifact(
            project=PROJECT,
            steps=[Parallel(flaky, Collect(), retries=1), Finalize(Operation(name="noop"))],
        )
        assert client.submit(artifact).wait(timeout=TIMEOUT).state is ArtifactState.COMPLETED
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    retried = [line for line in lines if "retrying" in line["message"]]
    assert retried, stream.getvalue()[-2000:]
    assert all(line["artifact_id"] == artifact.id for line in retried)
    assert all(line["job_id"] == 0 and line["attempt"] == 1 for line in retried)


# --- 9: no re-sends to a worker working through its queue -------------------------------------


def test_a_worker_working_through_a_long_queue_gets_no_re_sends(nodes: Nodes) -> None:
    _, _, client = nodes.start("w0", executors=["shell"], max_jobs=2)
    jobs = MessageRecorder()
    nodes.observer([topics.jobs("w0")], jobs)
    # 12 jobs, dispatched together, queued far longer than the 0.5 s re-send interval;
    # two runners end them out of order (even replicas are slower).
    slow_even = "if [ $((FLOTTA_REPLICA % 2)) -eq 0 ]; then sleep 0.3; else sleep 0.05; fi"
    task = Task(name="t", replicas=12, worker="w0", params={"shell": slow_even})
    handle = client.submit(Artifact(project=PROJECT, steps=[Tasks(tasks=[task])]))
    assert handle.wait(timeout=TIMEOUT).state is ArtifactState.COMPLETED
    ready = messages_of(jobs.messages, JobReady)
    assert len(ready) == 12, "a job answered out of order made the others look lost"
    assert sorted(job.job_id for job in ready) == list(range(12))
