"""The runtime end to end, in one process: a scheduler, workers and a workbench on a real
mosquitto (the `broker` fixture), with the resource store on disk or on a real S3 API.

Nothing is mocked and nothing sleeps to synchronise: tests wait on handles (which wait on
retained status messages), on MessageRecorders, or poll with the bounded `wait_for`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import s3fs
from helpers import MessageRecorder, decoded, messages_of, wait_for
from moto.server import ThreadedMotoServer

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import ArtifactFailed, ArtifactHandle, Client
from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    Collect,
    Compare,
    Finalize,
    JobState,
    Operation,
    Parallel,
    Sequential,
)
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import (
    ArtifactStatus,
    CancelJob,
    EventAck,
    JobFailed,
    JobFinished,
    JobReady,
    JobRef,
    JobStarted,
    RemoteError,
    RequestRejected,
    decode,
    topics,
)
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport import store as store_module
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

PLUGIN = "tests.plugins.test_ops"
PROJECT = "demo"
WORKERS = ("w0", "w1", "w2")  # the scheduler orders workers by name: this is Sequential's order
SIZES = (120, 257, 391)  # uneven, so a result off by one worker's share cannot pass
TIMEOUT = 20.0  # generous: the machine running the suite may be busy


# --- data --------------------------------------------------------------------------------


@dataclass
class Data:
    """Each worker's own CSV (columns x, y) and the rows of all of them, concatenated."""

    files: dict[str, Path]
    rows: list[dict[str, float]]

    def count(self, threshold: float = 0.5) -> int:
        return sum(1 for row in self.rows if row["x"] > threshold)

    def total(self, column: str) -> float:
        return math.fsum(row[column] for row in self.rows)


def write_data(folder: Path, seed: int = 20240607) -> Data:
    """Generated with a fixed seed; floats written with repr() so they read back exactly."""
    rng = random.Random(seed)
    files: dict[str, Path] = {}
    rows: list[dict[str, float]] = []
    for name, size in zip(WORKERS, SIZES, strict=True):
        mine = [{"x": rng.random(), "y": rng.gauss(10.0, 3.0)} for _ in range(size)]
        path = folder / f"{name}.csv"
        path.write_text("x,y\n" + "".join(f"{r['x']!r},{r['y']!r}\n" for r in mine))
        files[name] = path
        rows += mine
    return Data(files, rows)


X_ABOVE_HALF = Compare(column="x", op=">", value=0.5).model_dump()


def estimate(name: str, **params: Any) -> Artifact:
    """The seed's shape: `name` on every worker → Collect → merged on the initiator."""
    operation = Operation(name=name, params=params)
    return Artifact(project=PROJECT, steps=[Parallel(operation, Collect()), Finalize(operation)])


# --- a cluster of in-process nodes ----------------------------------------------------------


@dataclass
class Cluster:
    """Builds nodes against one broker and store; stops whatever is still running at the end."""

    broker_url: str
    folder: Path
    data: Data
    storage: StorageSettings
    running: list[SchedulerNode | WorkerAgent | Client] = field(default_factory=list)

    @property
    def broker(self) -> BrokerSettings:
        return BrokerSettings(url=self.broker_url)

    @property
    def database(self) -> Path:
        return self.folder / "scheduler.db"

    def scheduler(self, **settings: Any) -> SchedulerNode:
        config = SchedulerConfig(
            broker=self.broker,
            storage=self.storage,
            database=self.database,
            initiator_plugins=[PLUGIN],
            **settings,
        )
        node = SchedulerNode(config).start(wait=TIMEOUT)
        self.running.append(node)
        return node

    def worker(self, name: str, **settings: Any) -> WorkerAgent:
        config = WorkerConfig(
            name=name,
            broker=self.broker,
            storage=self.storage,
            datasets={PROJECT: {"paths": [self.data.files[name]], "privacy": {"exact": True}}},
            plugins=[PLUGIN],
            **settings,
        )
        node = WorkerAgent(config).start(wait=TIMEOUT)
        self.running.append(node)
        return node

    def client(self) -> Client:
        client = Client(self.broker, storage=self.storage, resend_interval=1.0)
        self.running.append(client)
        return client

    def stop(self, node: SchedulerNode | WorkerAgent | Client) -> None:
        """Stop a node now (once), as its operator would."""
        self.running.remove(node)
        if isinstance(node, Client):
            node.close()
        else:
            node.stop()

    def start_all(
        self, **scheduler_settings: Any
    ) -> tuple[SchedulerNode, list[WorkerAgent], Client]:
        """A scheduler, the three workers and a workbench that has seen them all online."""
        scheduler = self.scheduler(**scheduler_settings)
        workers = [self.worker(name) for name in WORKERS]
        client = self.client()
        wait_online(client, [*WORKERS, scheduler.config.initiator])
        return scheduler, workers, client

    def close(self) -> None:
        for node in reversed(list(self.running)):
            self.stop(node)


@pytest.fixture
def cluster(broker: LocalBroker, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(
        broker.url,
        tmp_path,
        write_data(tmp_path),
        StorageSettings(url=(tmp_path / "store").as_uri()),
    )
    try:
        yield nodes
    finally:
        nodes.close()


def wait_online(client: Client, names: tuple[str, ...] | list[str]) -> None:
    """Wait until the broker holds an online presence for every named node.

    Presence reaches the scheduler no later than this client (the scheduler subscribed
    first), so an artifact submitted afterwards is bound to all of them.
    """
    wait_for(
        lambda: set(names) <= {p.node for p in client.workers(timeout=TIMEOUT) if p.online},
        timeout=TIMEOUT,
        message=f"workers {names} not all online",
    )


def wait_status(
    handle: ArtifactHandle, predicate: Callable[[ArtifactStatus], bool], what: str
) -> ArtifactStatus:
    def settled() -> bool:
        status = handle.status()
        return status is not None and predicate(status)

    if not settled():
        wait_for(settled, timeout=TIMEOUT, message=f"artifact {handle.artifact_id} never {what}")
    status = handle.status()
    assert status is not None
    return status


def completed(status: ArtifactStatus) -> int:
    return status.counts.get(JobState.COMPLETED, 0)


def job_rows(database: Path, artifact_id: str) -> list[tuple[int, str, int]]:
    """(job id, state, attempt) of every job, from the scheduler's database file."""
    with sqlite3.connect(database) as db:
        return db.execute(
            "SELECT job_id, state, attempt FROM jobs WHERE artifact_id = ? ORDER BY job_id",
            (artifact_id,),
        ).fetchall()


def started(artifact_id: str, job_ids: set[int]) -> Callable[[list[tuple[str, bytes]]], bool]:
    """A MessageRecorder predicate: every one of these jobs has sent JobStarted.

    (The retained status is republished when jobs complete, not when they start.)
    """

    def seen(messages: list[tuple[str, bytes]]) -> bool:
        running = {
            event.job.job_id
            for event in messages_of(messages, JobStarted)
            if event.job.artifact_id == artifact_id
        }
        return job_ids <= running

    return seen


def observer(broker_url: str, subscriptions: list[str], recorder: MessageRecorder) -> Bus:
    """A bare bus client: it watches topics and publishes raw bytes, as a hostile node could."""
    return Bus(
        client_id=f"observer-{uuid.uuid4().hex[:8]}",
        settings=BrokerSettings(url=broker_url),
        on_message=recorder,
        subscriptions=subscriptions,
        clean=True,
    ).start(wait=TIMEOUT)


def logged(caplog: pytest.LogCaptureFixture, *fragments: str) -> Callable[[], bool]:
    """A predicate: some ERROR record's message contains every fragment."""

    def seen() -> bool:
        return any(
            r.levelno >= logging.ERROR and all(f in r.getMessage() for f in fragments)
            for r in list(caplog.records)
        )

    return seen


# --- 1, 2: the seed example --------------------------------------------------------------


def test_seed_example_count_sum_and_mean_over_three_workers(cluster: Cluster) -> None:
    _, _, client = cluster.start_all()
    count = client.submit(estimate("count", where=X_ABOVE_HALF))
    total = client.submit(estimate("sum", column="y"))
    mean = client.submit(estimate("mean", column="x", where=X_ABOVE_HALF))

    assert count.result(timeout=TIMEOUT) == cluster.data.count() > 0
    assert math.isclose(total.result(timeout=TIMEOUT), cluster.data.total("y"), rel_tol=1e-9)
    above = [row["x"] for row in cluster.data.rows if row["x"] > 0.5]
    assert math.isclose(mean.result(timeout=TIMEOUT), math.fsum(above) / len(above), rel_tol=1e-9)
    # One job per worker plus the initiator's: every worker took part.
    status = count.wait(timeout=TIMEOUT)
    assert status.total == len(WORKERS) + 1
    assert completed(status) == status.total


def test_sequential_visits_workers_in_order_and_counts_the_same(cluster: Cluster) -> None:
    scheduler, _, client = cluster.start_all()
    trail = client.submit(Artifact(project=PROJECT, steps=[Sequential(Operation(name="trail"))]))
    initiator = scheduler.config.initiator
    assert trail.result(timeout=TIMEOUT)["trail"] == [initiator, *WORKERS, initiator]

    where = {"where": X_ABOVE_HALF}
    sequential = client.submit(
        Artifact(project=PROJECT, steps=[Sequential(Operation(name="count", params=where))])
    )
    parallel = client.submit(estimate("count", **where))
    assert sequential.result(timeout=TIMEOUT) == parallel.result(timeout=TIMEOUT)
    assert sequential.result(timeout=TIMEOUT) == cluster.data.count()


# --- 3: a worker offline when its job becomes ready -------------------------------------------


def test_offline_worker_gets_its_job_when_it_comes_back(cluster: Cluster) -> None:
    # An earlier run of w2 left its retained presence (now "offline") and its session.
    cluster.stop(cluster.worker("w2"))
    scheduler = cluster.scheduler()
    cluster.worker("w0")
    cluster.worker("w1")
    client = cluster.client()
    wait_online(client, ["w0", "w1", scheduler.config.initiator])
    assert {p.node: p.online for p in client.workers()}["w2"] is False

    handle = client.submit(estimate("count", where=X_ABOVE_HALF))
    # w0 and w1 finish their parts; w2's job waits for w2, and so does the Finalize.
    status = wait_status(handle, lambda s: completed(s) == 2, "had two jobs completed")
    assert status.state is ArtifactState.RUNNING
    assert status.total == len(WORKERS) + 1
    assert status.counts.get(JobState.DISPATCHED) == 1

    cluster.worker("w2")  # started again with the same name: its session holds the job
    assert handle.result(timeout=TIMEOUT) == cluster.data.count()


# --- 4: a finished event delivered twice --------------------------------------------------


def test_duplicate_finished_event_changes_nothing(cluster: Cluster, broker: LocalBroker) -> None:
    # No periodic re-sends during the test: every JobReady seen is a dispatch.
    _, _, client = cluster.start_all(resend_interval=120.0)
    events, control = MessageRecorder(), MessageRecorder()
    watch_events = observer(broker.url, [topics.ALL_EVENTS, topics.jobs("+")], events)
    watch_acks = observer(broker.url, [topics.control("w0")], control)
    try:
        flag = cluster.folder / "go"
        ledger = cluster.folder / "ledger"
        # jobs 0-2: once on w0..w2 → job 3: slow initialize (waits for the flag) →
        # jobs 4-6: slow on w0..w2 → job 7: slow aggregate. Result: 3 + 3.
        artifact = Artifact(
            project=PROJECT,
            steps=[
                Parallel(Operation(name="once", params={"ledger": str(ledger)}), Collect()),
                Sequential(Operation(name="slow", params={"flag": str(flag)})),
            ],
        )
        handle = client.submit(artifact)

        def finished_job_0(messages: list[tuple[str, bytes]]) -> bytes | None:
            for topic, payload in messages:  # the payload: perhaps a batch holding it
                if topic == topics.events("w0") and messages_of(
                    [(topic, payload)], JobFinished, lambda event: event.job.job_id == 0
                ):
                    return payload
            return None

        events.wait_for(finished_job_0, timeout=TIMEOUT, message="w0 never finished job 0")
        original = finished_job_0(events.messages)
        assert original is not None
        events.wait_for(started(artifact.id, {3}), timeout=TIMEOUT, message="job 3 never started")

        def acks_of_job_0(messages: list[tuple[str, bytes]]) -> int:
            """How often the scheduler has acknowledged w0's finished job 0 so far."""
            return sum(
                1
                for ack in messages_of(messages, EventAck)
                for ref in ack.jobs
                if ref.artifact_id == artifact.id and ref.job_id == 0
            )

        # During the run: the duplicate arrives while job 3 runs and jobs 4-7 wait.
        control.wait_for(lambda messages: acks_of_job_0(messages) >= 1, timeout=TIMEOUT)
        before = acks_of_job_0(control.messages)
        watch_events.publish_raw(topics.events("w0"), original)
        control.wait_for(lambda messages: acks_of_job_0(messages) > before, timeout=TIMEOUT)
        during = handle.fetch_status(timeout=TIMEOUT)
        assert during is not None and during.state is ArtifactState.RUNNING
        assert completed(during) == 3

        flag.touch()
        assert handle.result(timeout=TIMEOUT) == 6

        # After the artifact completed: acknowledged again, and nothing else happens.
        before = acks_of_job_0(control.messages)
        watch_events.publish_raw(topics.events("w0"), original)
        control.wait_for(lambda messages: acks_of_job_0(messages) > before, timeout=TIMEOUT)
        assert handle.result(timeout=TIMEOUT) == 6
        final = handle.fetch_status(timeout=TIMEOUT)
        assert final is not None and final.state is ArtifactState.COMPLETED

        dispatches = [
            message
            for topic, message in decoded(events.messages)
            if topics.parse(topic).channel is topics.Channel.JOBS
        ]
    finally:
        watch_events.stop()
        watch_acks.stop()
    # Each job was dispatched exactly once, and each `once` ran once.
    assert sorted((j.job_id, j.attempt) for j in dispatches) == [(j, 1) for j in range(8)]
    assert len(ledger.read_text().splitlines()) == len(WORKERS)
    cluster.close()  # stop the scheduler: its database is then complete on disk
    assert job_rows(cluster.database, artifact.id) == [(j, JobState.COMPLETED, 1) for j in range(8)]


# --- 5: a remote exception ----------------------------------------------------------------


def test_failing_operation_fails_the_artifact_with_the_remote_traceback(
    cluster: Cluster,
) -> None:
    _, _, client = cluster.start_all()
    handle = client.submit(
        Artifact(
            project=PROJECT,
            steps=[
                Parallel(Operation(name="boom", params={"message": "no cheese"}), Collect()),
                Finalize(Operation(name="count")),
            ],
        )
    )
    with pytest.raises(ArtifactFailed) as failure:
        handle.result(timeout=TIMEOUT)
    message = str(failure.value)
    assert "ValueError" in message
    assert "boom: no cheese" in message
    assert "_explode" in message and "test_ops.py" in message  # the remote traceback
    assert failure.value.remote.type == "ValueError"
    assert failure.value.status.state is ArtifactState.FAILED
    assert failure.value.status.failed_job in range(len(WORKERS))


# --- 6: malformed messages on every topic a node reads ----------------------------------------


def test_malformed_messages_are_rejected_and_nodes_keep_serving(
    cluster: Cluster, broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="flotta_mqtt")
    _, _, client = cluster.start_all()
    replies = MessageRecorder()
    evil = "evil-client"
    prober = observer(broker.url, [topics.reply(evil)], replies)
    garbage = b"\xff\x00 not json"
    wrong_shape = b"[1, 2, 3]"
    ready = JobReady(
        artifact_id="a1",
        job_id=0,
        attempt=1,
        project=PROJECT,
        seed=1,
        step="0",
        kind="parallel",
        role="local",
        iteration=0,
        operation=Operation(name="count"),
    )
    bad_attempt = json.dumps({**ready.model_dump(mode="json"), "attempt": 0}).encode()
    bad_hash = json.dumps(
        {
            "event": "finished",
            "job": {"artifact_id": "a1", "job_id": 0, "attempt": 1},
            "product": {"url": "file:///nowhere", "sha256": "not-a-hash", "size": 1},
            "started_at": 1.0,
            "finished_at": 2.0,
        }
    ).encode()
    # (topic, payload, fragments the logged error must contain)
    cases = [
        (
            topics.submit(evil),
            garbage,
            ["scheduler rejected", "invalid submit message", "Invalid JSON"],
        ),
        (
            topics.submit(evil),
            wrong_shape,
            ["scheduler rejected", "invalid submit message", "Input should be an object"],
        ),
        (
            topics.submit(evil),
            b'{"project": "demo"}',
            ["scheduler rejected", "invalid submit message", "steps: Field required"],
        ),
        (
            topics.cancel(evil),
            garbage,
            ["scheduler rejected", "invalid cancel message", "Invalid JSON"],
        ),
        (
            topics.cancel(evil),
            b'{"artifact_id": "../x"}',
            ["scheduler rejected", "artifact_id: String should match"],
        ),
        (
            topics.events("w0"),
            garbage,
            ["scheduler rejected", "invalid events message", "Invalid JSON"],
        ),
        (
            topics.events("w0"),
            b'{"event": "exploded"}',
            ["scheduler rejected", "Input tag 'exploded'"],
        ),
        (topics.events("w0"), bad_hash, ["scheduler rejected", "invalid events message", "sha256"]),
        (
            topics.presence("w9"),
            garbage,
            ["scheduler rejected", "invalid presence message", "Invalid JSON"],
        ),
        (
            topics.presence("w9"),
            b'{"node": "w9"}',
            ["scheduler rejected", "invalid presence message", "online: Field required"],
        ),
        (
            topics.jobs("w0"),
            garbage,
            ["worker w0 rejected", "invalid jobs message", "Invalid JSON"],
        ),
        (topics.jobs("w1"), wrong_shape, ["worker w1 rejected", "Input should be an object"]),
        (
            topics.jobs("w2"),
            bad_attempt,
            ["worker w2 rejected", "attempt: Input should be greater than or equal to 1"],
        ),
        (
            topics.control("w0"),
            garbage,
            ["worker w0 rejected", "invalid control message", "Invalid JSON"],
        ),
        (
            topics.control("w1"),
            b'{"type": "event_ack", "jobs": 7}',
            ["worker w1 rejected", "event_ack.jobs: Input should be a valid array"],
        ),
        (f"{topics.ROOT}/requests/{evil}/bogus", b"{}", ["is not a topic of protocol v1"]),
    ]
    try:
        for topic, payload, fragments in cases:
            prober.publish_raw(topic, payload)
            wait_for(
                logged(caplog, *fragments),
                timeout=TIMEOUT,
                message=f"no error logged for {payload[:40]!r} on {topic}",
            )
        # Requests have someone to answer: each bad submit and cancel got its reply.
        answered = replies.wait(5, timeout=TIMEOUT)
    finally:
        prober.stop()
    rejections = [decode(topic, payload)[1] for topic, payload in answered]
    assert all(isinstance(r, RequestRejected) for r in rejections)
    assert [r.topic for r in rejections] == [topics.submit(evil)] * 3 + [topics.cancel(evil)] * 2
    assert "Invalid JSON" in rejections[0].error
    assert "steps: Field required" in rejections[2].error

    # And every node still serves.
    handle = client.submit(estimate("count", where=X_ABOVE_HALF))
    assert handle.result(timeout=TIMEOUT) == cluster.data.count()


# --- 7: forged events ---------------------------------------------------------------------------


def test_a_rejection_fails_only_the_request_it_names(cluster: Cluster) -> None:
    """Two handles wait; the scheduler rejects the request of one (a submission it cannot
    read, naming its artifact): that one fails, the other waits on."""
    cluster.scheduler()
    client = cluster.client()
    waiting = client.handle("still-waiting")
    rejected = client.handle("unreadable")
    unreadable = {"id": "unreadable", "project": PROJECT, "steps": "not a list"}
    client.bus.publish_raw(topics.submit(client.client_id), json.dumps(unreadable).encode())
    with pytest.raises(ValueError, match="rejected the request"):
        rejected.wait(timeout=TIMEOUT)
    with pytest.raises(TimeoutError):  # the rejection has arrived: it is not this one's
        waiting.wait(timeout=0)


def test_events_from_a_worker_not_owning_the_job_are_ignored(
    cluster: Cluster, broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="flotta_mqtt")
    _, _, client = cluster.start_all()
    flag = cluster.folder / "go"
    artifact = Artifact(
        project=PROJECT,
        steps=[
            Parallel(Operation(name="slow", params={"flag": str(flag)}), Collect()),
            Finalize(Operation(name="slow")),
        ],
    )
    handle = client.submit(artifact)
    wait_status(handle, lambda s: s.state is ArtifactState.RUNNING, "started running")

    # A product that would change the result, stored where a real one could be.
    store = ResourceStore(cluster.storage.url, cluster.storage.options)
    forged = store.put(f"{store.root}/forged/product", b"1000")
    ref = JobRef(artifact_id=artifact.id, job_id=0, attempt=1)  # job 0 belongs to w0
    now = time.time()
    prober = observer(broker.url, [], MessageRecorder())
    try:
        finished = JobFinished(job=ref, product=forged, started_at=now, finished_at=now)
        prober.publish(topics.events("w1"), finished)
        failed = JobFailed(job=ref, error=RemoteError(type="Forged", message="x"), finished_at=now)
        prober.publish(topics.events("w2"), failed)
        for impostor in ("w1", "w2"):
            wait_for(
                logged(
                    caplog, f"{impostor} reported on job {artifact.id}/0", "given to w0", "ignored"
                ),
                timeout=TIMEOUT,
                message=f"the forged event from {impostor} was not reported as ignored",
            )
    finally:
        prober.stop()
    status = handle.fetch_status(timeout=TIMEOUT)
    assert status is not None and status.state is ArtifactState.RUNNING
    assert completed(status) == 0

    flag.touch()
    assert handle.result(timeout=TIMEOUT) == len(WORKERS)


# --- 8: nobody holds the project ------------------------------------------------------------


def test_project_no_worker_holds_fails_with_a_clear_error(cluster: Cluster) -> None:
    _, _, client = cluster.start_all(worker_grace=0.2, resend_interval=0.5)
    handle = client.submit(
        Artifact(
            project="nowhere",
            steps=[Parallel(Operation(name="count"), Collect()), Finalize(Operation(name="count"))],
        )
    )
    status = handle.wait(timeout=TIMEOUT)
    assert status.state is ArtifactState.FAILED
    assert status.error is not None
    assert status.error.type == "NoWorkers"
    assert "no worker holds data for project nowhere" in status.error.message
    with pytest.raises(ArtifactFailed, match="no worker holds data for project nowhere"):
        handle.result(timeout=TIMEOUT)


# --- 9: cancel ------------------------------------------------------------------------------


def test_cancel_stops_a_running_artifact(cluster: Cluster) -> None:
    _, _, client = cluster.start_all()
    flag = cluster.folder / "never"
    artifact = Artifact(
        project=PROJECT,
        steps=[
            Parallel(Operation(name="slow", params={"flag": str(flag)}), Collect()),
            Finalize(Operation(name="count")),
        ],
    )
    events = MessageRecorder()
    watch = observer(cluster.broker_url, [topics.ALL_EVENTS, topics.control("+")], events)
    handle = client.submit(artifact)
    try:
        events.wait_for(started(artifact.id, {0, 1, 2}), timeout=TIMEOUT)
        client.cancel(artifact.id)
        status = handle.wait(timeout=TIMEOUT)
        assert status.state is ArtifactState.CANCELLED
        assert status.counts == {JobState.CANCELLED: len(WORKERS) + 1}
        with pytest.raises(ArtifactFailed, match="Cancelled"):
            handle.result(timeout=TIMEOUT)
        # Each worker running one of its jobs was told to stop it.
        events.wait_for(
            lambda messages: (
                {
                    (topic, message.job.job_id)
                    for topic, payload in messages
                    if isinstance(message := decode(topic, payload)[1], CancelJob)
                }
                == {(topics.control(w), j) for j, w in enumerate(WORKERS)}
            ),
            timeout=TIMEOUT,
            message="the workers were not all told to cancel their jobs",
        )
    finally:
        watch.stop()
        flag.touch()  # in any case, let the workers' threads finish


# --- 10: downloads ---------------------------------------------------------------------------


def test_result_downloads_as_json(cluster: Cluster) -> None:
    _, _, client = cluster.start_all()
    handle = client.submit(estimate("mean", column="y"))
    target = handle.download(cluster.folder / "result.json", timeout=TIMEOUT)
    assert json.loads(target.read_text()) == handle.result(timeout=TIMEOUT)
    assert math.isclose(
        json.loads(target.read_text()),
        cluster.data.total("y") / len(cluster.data.rows),
        rel_tol=1e-9,
    )


def test_results_stay_put_without_allow_download(cluster: Cluster) -> None:
    _, _, client = cluster.start_all(allow_download=False)
    handle = client.submit(estimate("count", where=X_ABOVE_HALF))
    with pytest.raises(PermissionError, match="allow_download"):
        handle.result(timeout=TIMEOUT)
    status = handle.wait(timeout=TIMEOUT)
    assert status.state is ArtifactState.COMPLETED and status.results == []
    with pytest.raises(PermissionError):
        handle.download(cluster.folder / "result.json", timeout=TIMEOUT)
    assert not (cluster.folder / "result.json").exists()


# --- 11: the S3 path ---------------------------------------------------------------------------


@pytest.fixture
def s3_storage() -> Iterator[StorageSettings]:
    """A bucket on moto's S3 server on loopback; settings every node uses to reach it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        deadline = time.monotonic() + TIMEOUT
        while True:  # bounded: the server thread listens once it answers any request
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1.0):
                    break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        credentials = {"key": "k", "secret": "s"}
        bucket = f"flotta-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(
            **credentials, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True
        ).mkdir(bucket)
        yield StorageSettings(
            url=f"s3://{bucket}/prefix", options={"endpoint_url": endpoint, **credentials}
        )
    finally:
        server.stop()


def test_seed_example_with_products_on_s3(
    cluster: Cluster, s3_storage: StorageSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "INLINE_BYTES", -1)  # no product travels inline
    cluster.storage = s3_storage
    _, _, client = cluster.start_all()
    handle = client.submit(estimate("count", where=X_ABOVE_HALF))
    assert handle.result(timeout=TIMEOUT) == cluster.data.count()
    status = handle.wait(timeout=TIMEOUT)
    assert status.results and all(r.url.startswith(f"{s3_storage.url}/") for r in status.results)
