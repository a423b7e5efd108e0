"""Garbage and near-valid messages on every topic a node reads, against running nodes.

One scheduler (with its initiator), one worker and a workbench run for the whole module on
a real mosquitto. Hypothesis generates batches of payloads per topic: bytes, JSON of any
shape, truncated or bit-flipped valid messages, and valid messages with one field (at any
depth) dropped, retyped, out of range, huge, unicode or joined by an extra one. After each
batch the test asserts what the protocol promises:

- every payload the protocol's decoder refuses was logged as rejected, once, by each node
  that reads the topic (valid ones are not, and a valid but forged presence is accepted by
  design);
- no exception escaped a handler (nothing logged with a traceback, no "error in" from the
  bus's guarded callbacks) and every node thread is alive and connected;
- the nodes still serve: a count artifact completes with the right result.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import Artifact, Collect, Finalize, Operation, Parallel
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import (
    MAX_MESSAGE_BYTES,
    CancelArtifact,
    CancelJob,
    EventAck,
    JobAccepted,
    JobFailed,
    JobFinished,
    JobHeartbeat,
    JobProgress,
    JobReady,
    JobRef,
    JobStarted,
    NodePresence,
    ProtocolError,
    RemoteError,
    Resource,
    decode,
    topics,
)
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport import base as transport_base
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

TIMEOUT = 20.0
PROJECT = "fuzzcheck"  # what the real worker holds; no generated message names it
GHOST_PROJECT = "ghostproj"  # what forged presences may hold; no generated artifact asks for it
NOWHERE = "nowhere"  # the project of generated artifacts and jobs: nobody holds it
CLIENT = "fuzzer"
WORKER = "w0"
INITIATOR = "scheduler.initiator"
GHOST = "ghost"
ROWS = 23
FUZZ = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
BATCH = {"min_size": 60, "max_size": 120}  # payloads per example: ~700 per topic group


# --- the running nodes -------------------------------------------------------------------------


class Records(logging.Handler):
    """Every record the nodes log at WARNING or above, kept for counting."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self._mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._mutex:
            self.records.append(record)

    def snapshot(self) -> list[logging.LogRecord]:
        with self._mutex:
            return list(self.records)

    def rejections(self, node: str) -> int:
        """How many messages `node` ('scheduler', 'worker w0', 'workbench x') rejected."""
        prefix = f"{node} rejected a message"
        return sum(
            1
            for r in self.snapshot()
            if r.levelno >= logging.ERROR and r.getMessage().startswith(prefix)
        )

    def crashes(self, since: int = 0) -> list[str]:
        """Records that say an exception escaped some handler: logged with a traceback
        (log.exception, as every node's catch-all and the bus's guarded callbacks do)."""
        return [
            r.getMessage() + ("\n" + self.format(r) if r.exc_info else "")
            for r in self.snapshot()[since:]
            if r.exc_info is not None or "network thread kept alive" in r.getMessage()
        ]


@dataclass
class Fleet:
    scheduler: SchedulerNode
    worker: WorkerAgent
    client: Client
    prober: Bus
    log: Records
    folder: Path
    finished_artifact: str  # a real artifact, over: events about it are acknowledged

    def readers(self, topic: str) -> list[str]:
        """The nodes that decode (and log rejections of) messages on `topic`."""
        address = topics.parse(topic)
        if address.channel is topics.Channel.PRESENCE:
            return ["scheduler", f"workbench {self.client.client_id}"]
        if address.channel in (topics.Channel.JOBS, topics.Channel.CONTROL):
            return [f"worker {address.name}"]
        return ["scheduler"]

    def count_artifact(self) -> Artifact:
        count = Operation(name="count")
        return Artifact(project=PROJECT, steps=[Parallel(count, Collect()), Finalize(count)])

    def check_healthy(self) -> None:
        """No escaped exception, every node thread alive and connected, and still serving."""
        assert self.log.crashes() == []
        # The nodes' own threads still run.
        assert self.scheduler.scheduler.running
        assert self.worker.alive()
        initiator = self.scheduler.initiator
        assert initiator is not None and initiator.alive()
        for node in (self.scheduler.scheduler, self.worker, initiator, self.client):
            assert node is not None and node.bus.connected.is_set()
        handle = self.client.submit(self.count_artifact())
        assert handle.result(timeout=TIMEOUT) == ROWS
        assert self.log.crashes() == []


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("fuzz")
    records = Records()
    logger = logging.getLogger("flotta_mqtt")
    logger.addHandler(records)
    started: list[SchedulerNode | WorkerAgent | Client | Bus] = []
    try:
        with LocalBroker() as broker:
            try:
                yield start_fleet(broker, folder, records, started)
            finally:
                for node in reversed(started):
                    node.close() if isinstance(node, Client) else node.stop()
    finally:
        logger.removeHandler(records)


def start_fleet(
    broker: LocalBroker,
    folder: Path,
    records: Records,
    started: list[SchedulerNode | WorkerAgent | Client | Bus],
) -> Fleet:
    """Start the nodes (each added to `started` at once) and run one artifact through them."""
    data = folder / "w0.csv"
    data.write_text("x\n" + "".join(f"{i}\n" for i in range(ROWS)))
    node = BrokerSettings(url=broker.url)
    storage = StorageSettings(url=(folder / "store").as_uri())
    scheduler = SchedulerNode(
        SchedulerConfig(
            broker=node,
            storage=storage,
            database=folder / "scheduler.db",
            resend_interval=0.5,
            worker_grace=0.0,  # an artifact nobody can run fails at once
        )
    )
    started.append(scheduler.start(wait=TIMEOUT))
    worker = WorkerAgent(
        WorkerConfig(
            name=WORKER,
            broker=node,
            storage=storage,
            datasets={PROJECT: {"paths": [data], "privacy": {"exact": True}}},
            resend_interval=0.5,
            heartbeat_interval=0.5,
        )
    )
    started.append(worker.start(wait=TIMEOUT))
    client = Client(node, client_id=f"workbench-{uuid.uuid4().hex[:8]}", storage=storage)
    started.append(client)
    wait_for(
        lambda: (
            {WORKER, INITIATOR} <= {p.node for p in client.workers(timeout=TIMEOUT) if p.online}
        ),
        timeout=TIMEOUT,
        message="the nodes never came online",
    )
    prober = Bus(
        client_id=f"prober-{uuid.uuid4().hex[:8]}",
        settings=BrokerSettings(url=broker.url),
        on_message=lambda topic, payload: None,
        subscriptions=[],
        clean=True,
    )
    started.append(prober.start(wait=TIMEOUT))
    fleet = Fleet(scheduler, worker, client, prober, records, folder, "")
    first = fleet.count_artifact()
    assert client.submit(first).result(timeout=TIMEOUT) == ROWS
    fleet.finished_artifact = first.id
    return fleet


# --- payloads -----------------------------------------------------------------------------------

LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
JSON = st.recursive(
    LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
UNICODE = st.one_of(
    st.text(min_size=1, max_size=24),  # any code point but surrogates
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.sampled_from(["\x00", "é", "日本語", "🦆", "a/b", "../..", "+", "#", "\u202e", " "]),
)
OUT_OF_RANGE = st.one_of(
    st.sampled_from([-1, 0, -(2**63), 2**63, 2**64, 10**30, -0.5, 1e308, -1e308, 1.5]),
    st.integers(),
    st.floats(),
)

Path_ = tuple[str | int, ...]


def field_paths(value: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Every field of a JSON value, at any depth (the root excluded)."""
    children: list[tuple[str | int, Any]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    for key, child in children:
        yield (*prefix, key)
        yield from field_paths(child, (*prefix, key))


def container(value: Any, path: Path_) -> Any:
    for key in path:
        value = value[key]
    return value


@st.composite
def near_valid(draw: st.DrawFn, bases: list[dict[str, Any]]) -> bytes:
    """A valid message with one field changed."""
    message = copy.deepcopy(draw(st.sampled_from(bases)))
    path = draw(st.sampled_from(list(field_paths(message))))
    parent, key = container(message, path[:-1]), path[-1]
    how = draw(st.sampled_from(["drop", "type", "extra", "range", "huge", "unicode", "null"]))
    if how == "drop":
        del parent[key]
    elif how == "type":
        parent[key] = draw(JSON)
    elif how == "extra":
        target = parent[key] if isinstance(parent[key], dict) else message
        target[draw(st.text(min_size=1, max_size=8))] = draw(JSON)
    elif how == "range":
        parent[key] = draw(OUT_OF_RANGE)
    elif how == "huge":
        parent[key] = draw(st.sampled_from("xé🦆")) * draw(st.integers(100, 20_000))
    elif how == "unicode":
        parent[key] = draw(UNICODE)
    else:
        parent[key] = None
    text = json.dumps(message, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", errors="surrogatepass")  # lone surrogates: invalid UTF-8


@st.composite
def damaged(draw: st.DrawFn, bases: list[dict[str, Any]]) -> bytes:
    """A valid message cut short or with one byte changed."""
    payload = json.dumps(draw(st.sampled_from(bases))).encode()
    at = draw(st.integers(0, len(payload) - 1))
    if draw(st.booleans()):
        return payload[:at]
    return payload[:at] + bytes([draw(st.integers(0, 255))]) + payload[at + 1 :]


def payloads(bases: list[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        JSON.map(lambda value: json.dumps(value).encode()),
        damaged(bases),
        near_valid(bases),
        near_valid(bases),
        near_valid(bases),
    )


def dump(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = message.model_dump(mode="json")
    return result


def artifact_bases() -> list[dict[str, Any]]:
    count = Operation(name="count", params={"where": {"column": "x", "op": ">", "value": 1}})
    artifact = Artifact(
        id="fuzz-artifact",
        project=NOWHERE,
        steps=[Parallel(count, Collect(), retries=1, timeout=5.0), Finalize(count)],
        seed=7,
        deadline=30.0,
    )
    return [dump(artifact)]


def event_bases(artifact_id: str) -> list[dict[str, Any]]:
    ref = JobRef(artifact_id=artifact_id, job_id=0, attempt=1)
    product = Resource(url="file:///nowhere/product", sha256="ab" * 32, size=3)
    error = RemoteError(type="ValueError", message="no", traceback="Traceback ...")
    return [
        dump(event)
        for event in (
            JobAccepted(job=ref),
            JobStarted(job=ref, at=1.0),
            JobProgress(job=ref, fraction=0.5, message="half"),
            JobHeartbeat(jobs=[ref], at=2.0),
            JobFinished(job=ref, product=product, started_at=1.0, finished_at=2.0),
            JobFailed(job=ref, error=error, finished_at=2.0),
        )
    ]


def presence_bases() -> list[dict[str, Any]]:
    presence = NodePresence(
        node=GHOST,
        online=True,
        projects=[GHOST_PROJECT],
        labels={"site": "far"},
        operations=["count"],
        max_jobs=2,
        details={GHOST_PROJECT: {"columns": ["x"]}},
        since=1.0,
    )
    return [dump(presence)]


def job_bases(artifact_id: str) -> list[dict[str, Any]]:
    job = JobReady(
        artifact_id=artifact_id,
        job_id=0,
        attempt=1,
        project=NOWHERE,
        seed=3,
        step="0",
        kind="parallel",
        role="local",
        iteration=0,
        operation=Operation(name="count"),
        inputs=[Resource(url="file:///nowhere/input", sha256="cd" * 32, size=1)],
    )
    return [dump(job)]


def control_bases(artifact_id: str) -> list[dict[str, Any]]:
    ref = JobRef(artifact_id=artifact_id, job_id=0, attempt=1)
    return [dump(EventAck(jobs=[ref, ref])), dump(CancelJob(job=ref))]


def invalid(topic: str, payload: bytes) -> bool:
    try:
        decode(topic, payload)
    except ProtocolError:
        return True
    return False


def harmless(topic: str, payload: bytes) -> bool:
    """Whether a valid payload may be sent without changing what the check relies on.

    A valid presence is accepted by design: one for the real worker would change what the
    scheduler believes about it, and one holding another project could bind generated
    artifacts to a node that never runs them. Such payloads are not sent.
    """
    address, message = decode(topic, payload)
    if isinstance(message, NodePresence):
        return address.name != WORKER and set(message.projects) <= {GHOST_PROJECT}
    if isinstance(message, Artifact):
        return message.project != GHOST_PROJECT
    return True


def send(fleet: Fleet, batch: list[tuple[str, bytes]]) -> dict[str, int]:
    """Publish a batch; wait until every node rejected what it must; return the counts sent."""
    logged = len(fleet.log.snapshot())
    expected = {
        node: fleet.log.rejections(node) for topic, _ in batch for node in fleet.readers(topic)
    }
    sent: dict[str, int] = {}
    for topic, payload in batch:
        bad = invalid(topic, payload)
        if not bad and not harmless(topic, payload):
            continue
        fleet.prober.publish_raw(topic, payload)
        sent[topic] = sent.get(topic, 0) + 1
        if bad:
            for node in fleet.readers(topic):
                expected[node] += 1
    for node, count in expected.items():
        wait_for(
            lambda node=node, count=count: fleet.log.rejections(node) >= count,
            timeout=TIMEOUT,
            message=f"{node} logged {fleet.log.rejections(node)} rejections, expected {count}",
        )
        assert fleet.log.rejections(node) == count, f"{node} rejected a valid message"
    assert fleet.log.crashes(since=logged) == []
    return sent


def fuzz(fleet: Fleet, targets: list[tuple[list[str], list[dict[str, Any]]]]) -> int:
    """Run the generated batches for these (topics, valid bases); return how many were sent."""
    total = 0
    strategy = st.lists(
        st.one_of([st.tuples(st.sampled_from(names), payloads(bases)) for names, bases in targets]),
        **BATCH,
    )

    @FUZZ
    @given(strategy)
    def run(batch: list[tuple[str, bytes]]) -> None:
        nonlocal total
        total += sum(send(fleet, batch).values())

    run()
    return total


# --- the topics the scheduler reads -------------------------------------------------------------


def test_fuzzed_submits_and_cancels(fleet: Fleet) -> None:
    cancels = [
        dump(CancelArtifact(artifact_id="fuzz-artifact")),
        dump(CancelArtifact(artifact_id=fleet.finished_artifact, reason="because")),
    ]
    sent = fuzz(
        fleet,
        [([topics.submit(CLIENT)], artifact_bases()), ([topics.cancel(CLIENT)], cancels)],
    )
    assert sent > 0
    fleet.check_healthy()


def test_fuzzed_worker_events(fleet: Fleet) -> None:
    names = [topics.events(WORKER), topics.events(GHOST), topics.events(INITIATOR)]
    sent = fuzz(fleet, [(names, event_bases(fleet.finished_artifact) + event_bases("fuzz-x"))])
    assert sent > 0
    fleet.check_healthy()


def test_fuzzed_presence(fleet: Fleet) -> None:
    names = [topics.presence(GHOST), topics.presence(WORKER), topics.presence("ghost-2")]
    sent = fuzz(fleet, [(names, presence_bases())])
    assert sent > 0
    fleet.check_healthy()


# --- the topics workers read ----------------------------------------------------------------------


def test_fuzzed_jobs(fleet: Fleet) -> None:
    # A valid job for an artifact that is over runs, fails (no data for its project) and is
    # acknowledged by the scheduler, so nothing is left re-sending.
    names = [topics.jobs(WORKER), topics.jobs(INITIATOR)]
    sent = fuzz(fleet, [(names, job_bases(fleet.finished_artifact))])
    assert sent > 0
    fleet.check_healthy()


def test_fuzzed_worker_control(fleet: Fleet) -> None:
    names = [topics.control(WORKER), topics.control(INITIATOR)]
    sent = fuzz(fleet, [(names, control_bases(fleet.finished_artifact))])
    assert sent > 0
    fleet.check_healthy()


# --- sizes at and past the limit ---------------------------------------------------------------


def padded(base: dict[str, Any], path: Path_, size: int) -> bytes:
    """`base` with the string at `path` grown so the whole payload is `size` bytes."""
    message = copy.deepcopy(base)
    parent = container(message, path[:-1])
    parent[path[-1]] = ""
    room = size - len(json.dumps(message).encode())
    parent[path[-1]] = "x" * room
    payload = json.dumps(message).encode()
    assert len(payload) == size
    return payload


def test_messages_at_and_over_the_size_limit(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    over = [MAX_MESSAGE_BYTES + 1, 2 * MAX_MESSAGE_BYTES]  # the broker's own limit is 1 MiB
    cases: list[tuple[str, dict[str, Any], Path_]] = [
        (topics.submit(CLIENT), artifact_bases()[0], ("project",)),
        (topics.cancel(CLIENT), dump(CancelArtifact(artifact_id="fuzz-artifact")), ("reason",)),
        (topics.events(WORKER), event_bases("fuzz-x")[4], ("product", "url")),
        (topics.events(WORKER), event_bases("fuzz-x")[5], ("error", "traceback")),
        (topics.presence(GHOST), presence_bases()[0], ("labels", "site")),
        (topics.jobs(WORKER), job_bases(fleet.finished_artifact)[0], ("step",)),
        (topics.control(WORKER), control_bases("fuzz-x")[1], ("job", "artifact_id")),
    ]
    batch = [
        (topic, padded(base, path, size))
        for topic, base, path in cases
        for size in (MAX_MESSAGE_BYTES, *over)
    ]
    # Bus refuses to publish past the limit; a hostile client would not: lift it here.
    monkeypatch.setattr(transport_base, "MAX_MESSAGE_BYTES", 2 * MAX_MESSAGE_BYTES)
    send(fleet, batch)
    for topic, payload in batch:
        if len(payload) > MAX_MESSAGE_BYTES:
            assert invalid(topic, payload)
    # At the limit, a long error traceback is still a valid message (and was not rejected).
    assert not invalid(topics.events(WORKER), padded(*cases[3][1:], MAX_MESSAGE_BYTES))
    fleet.check_healthy()


def test_ids_too_large_for_sqlite_are_rejected_on_receipt(fleet: Fleet) -> None:
    # Found by the fuzzing above: a job id or attempt of 2**63 or more passed validation,
    # then raised OverflowError inside the worker's journal (the scheduler's database would
    # too), logged as an internal error with the job left half-held.
    big = 2**63
    ref = {"artifact_id": fleet.finished_artifact, "job_id": 0, "attempt": 1}
    job = job_bases(fleet.finished_artifact)[0]
    batch = [
        (topics.jobs(WORKER), json.dumps({**job, "job_id": big}).encode()),
        (topics.jobs(INITIATOR), json.dumps({**job, "attempt": big}).encode()),
        (
            topics.control(WORKER),
            json.dumps({"type": "event_ack", "jobs": [{**ref, "attempt": 2**64}]}).encode(),
        ),
        (
            topics.control(WORKER),
            json.dumps({"type": "cancel_job", "job": {**ref, "job_id": big}}).encode(),
        ),
        (
            topics.events(WORKER),
            json.dumps(
                {**event_bases(fleet.finished_artifact)[4], "job": {**ref, "job_id": big}}
            ).encode(),
        ),
        (
            topics.events(WORKER),
            json.dumps(
                {**event_bases(fleet.finished_artifact)[3], "jobs": [{**ref, "attempt": big}]}
            ).encode(),
        ),
    ]
    assert all(invalid(topic, payload) for topic, payload in batch)
    send(fleet, batch)
    fleet.check_healthy()


def test_unknown_topics_under_the_root_are_logged_and_ignored(fleet: Fleet) -> None:
    before = fleet.log.snapshot()
    odd = [
        f"{topics.ROOT}/requests/{CLIENT}/explode",
        f"{topics.ROOT}/events/{WORKER}/extra",
        f"{topics.ROOT}/presence/{GHOST}/x",
        f"{topics.ROOT}/workers/{WORKER}/unknown",
    ]
    for topic in odd:
        fleet.prober.publish_raw(topic, b"{}")

    def logged(topic: str) -> Callable[[], bool]:
        return lambda: any(
            topic in r.getMessage() and "is not a topic" in r.getMessage()
            for r in fleet.log.snapshot()[len(before) :]
        )

    # The scheduler's subscriptions match only the first; the worker's inbox, the last.
    for topic in (odd[0], odd[3]):
        wait_for(logged(topic), timeout=TIMEOUT, message=f"nothing logged for {topic}")
    fleet.check_healthy()
