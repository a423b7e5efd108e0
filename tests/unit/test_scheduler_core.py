"""The scheduler's core driven in memory: no broker, no threads, a clock moved by hand.

A harness plays the service (the repository on an in-memory SQLite, commit, statuses
built after it) and simulated workers answer the jobs in random order: failures and
retries, duplicates and stale attempts (QoS 1 is at least once), workers going offline
and back, ticks. Every burst's decision is checked against the invariants.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flotta_mqtt.model import (
    ARTIFACT_FINAL,
    Artifact,
    ArtifactState,
    Collect,
    Finalize,
    JobGraph,
    JobState,
    Operation,
    Parallel,
    Registry,
    Sequential,
)
from flotta_mqtt.protocol import (
    CancelJob,
    EventAck,
    JobAccepted,
    JobFailed,
    JobFinished,
    JobHeartbeat,
    JobReady,
    JobRef,
    JobStarted,
    NodePresence,
    RemoteError,
    RequestRejected,
    Resource,
    encode,
    topics,
)
from flotta_mqtt.scheduler.announcements import build_status
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.scheduler.core import Policies, SchedulerCore
from flotta_mqtt.scheduler.effects import (
    BindArtifact,
    Clock,
    Decision,
    Event,
    Received,
    Tick,
    UpdateJob,
)
from flotta_mqtt.scheduler.metrics import SchedulerMetrics
from flotta_mqtt.scheduler.service import commit
from flotta_mqtt.scheduler.sqlite_repository import SqliteRepository

PROJECT = "p"
WORKERS = ("w0", "w1", "w2")
NOOP = Operation(name="noop")
TICK = 0.3


def scheduler_config(**settings: float) -> SchedulerConfig:
    values: dict[str, float] = {
        "worker_grace": 0.0,
        "retry_backoff": 0.0,
        "retry_backoff_max": 0.0,
        "heartbeat_grace": 1e9,
        **settings,
    }
    return SchedulerConfig(name="sched", database=Path(":memory:"), **values)


def presence(node: str, online: bool = True, initiator: bool = False) -> NodePresence:
    return NodePresence(
        node=node,
        online=online,
        initiator=initiator,
        projects=[] if initiator else [PROJECT],
        operations=["noop"],
        since=1.0,
    )


def product(ref: JobRef) -> Resource:
    return Resource(
        url=f"file:///p/{ref.artifact_id}/{ref.job_id}/{ref.attempt}", sha256="0" * 64, size=1
    )


@dataclass
class Harness:
    """A core and the service's part around it, with invariants checked on every burst."""

    config: SchedulerConfig
    seed: int = 0
    registry: Registry | None = None
    now: float = 1000.0
    wall: float = 1.7e9
    repository: SqliteRepository = field(init=False)
    core: SchedulerCore = field(init=False)
    pending: list[tuple[str, JobReady]] = field(default_factory=list)  # every JobReady sent
    completed: set[tuple[str, int]] = field(default_factory=set)
    attempts: Counter[tuple[str, int]] = field(default_factory=Counter)  # highest dispatched
    published: list[tuple[str, BaseModel]] = field(default_factory=list)
    graphs: dict[str, JobGraph] = field(default_factory=dict)  # as bound

    def __post_init__(self) -> None:
        self.repository = SqliteRepository(":memory:")
        policies = Policies.of(self.config, random.Random(self.seed))
        self.core = SchedulerCore(self.config, SchedulerMetrics(), policies, self.registry)
        self.core.restore([], {}, {}, [], self.clock())

    def clock(self) -> Clock:
        return Clock(self.now, self.wall, self.now)

    def burst(self, events: list[Event]) -> Decision:
        decision = self.core.handle(events, self.clock())
        self.check(decision)
        commit(self.repository, decision)
        for topic, message, _retain in decision.publish:
            encode(message)
            self.published.append((topic, message))
            if isinstance(message, JobReady):
                self.pending.append((topics.parse(topic).name, message))
        for record, wall in decision.statuses:
            encode(build_status(record, wall, True, lambda _id, _results: None))
        return decision

    def send(self, *messages: tuple[str, BaseModel]) -> Decision:
        return self.burst([Received(t, encode(m), self.now) for t, m in messages])

    def tick(self, seconds: float = TICK) -> Decision:
        self.now += seconds
        self.wall += seconds
        return self.burst([Tick()])

    def check(self, decision: Decision) -> None:
        """No job completes twice; a job is dispatched only once all its predecessors
        completed (or dropped out of a secure aggregation); attempts never exceed what the
        step allows."""
        for write in decision.writes:
            if isinstance(write, BindArtifact):
                self.graphs[write.artifact_id] = write.graph
            if not isinstance(write, UpdateJob):
                continue
            key = (write.artifact_id, write.job_id)
            if write.state in (JobState.COMPLETED, JobState.SKIPPED):
                assert key not in self.completed, f"{key} completed twice"
                self.completed.add(key)
            elif write.error is not None and write.error.type == "DroppedOut":
                self.completed.add(key)  # its locks are released: see dropouts.py
            elif write.state is JobState.DISPATCHED:
                graph = self.graphs[write.artifact_id]
                for before in graph.graph.predecessors(write.job_id):
                    assert (write.artifact_id, before) in self.completed, f"{key} locked"
                assert write.attempt == self.attempts[key] + 1
                self.attempts[key] = write.attempt
                lost = self.config.max_lost_attempts  # a lost attempt is run again too
                assert write.attempt <= graph.jobs[write.job_id].retries + 1 + lost

    def state(self, artifact_id: str) -> ArtifactState:
        row = self.repository.artifact(artifact_id)
        assert row is not None
        return row.state


def artifact(rng: random.Random, n: int) -> Artifact:
    retries = rng.randint(0, 2)
    first = (
        Parallel(NOOP, Collect(), retries=retries)
        if rng.random() < 0.5
        else Sequential(NOOP, retries=retries)
    )
    return Artifact(id=f"a{n:05d}", project=PROJECT, steps=[first, Finalize(NOOP, retries=retries)])


@dataclass
class Workers:
    """Simulated workers: each attempt gets one outcome, repeated to a re-sent JobReady."""

    rng: random.Random
    failure: float
    answers: dict[tuple[str, int, int], list[BaseModel]] = field(default_factory=dict)
    failed: Counter[tuple[str, int]] = field(default_factory=Counter)

    def answer(self, worker: str, ready: JobReady) -> list[tuple[str, BaseModel]]:
        ref = ready.ref
        key = (ref.artifact_id, ref.job_id, ref.attempt)
        known = self.answers.get(key)
        if known is not None:  # a re-send: the worker answers with what it knows
            return [(topics.events(worker), known[-1])]
        started = JobStarted(job=ref, at=1.0)
        final: BaseModel
        if self.rng.random() < self.failure:
            self.failed[(ref.artifact_id, ref.job_id)] += 1
            error = RemoteError(type="Boom", message="simulated")
            final = JobFailed(job=ref, error=error, started_at=1.0, finished_at=2.0)
        else:
            final = JobFinished(job=ref, product=product(ref), started_at=1.0, finished_at=2.0)
        said: list[BaseModel] = [JobAccepted(job=ref), started, final]
        said = said[self.rng.randint(0, 2) :]
        self.answers[key] = said
        return [(topics.events(worker), message) for message in said]


def interleave(
    rng: random.Random, sequences: list[list[tuple[str, BaseModel]]]
) -> Iterator[tuple[str, BaseModel]]:
    """Merge the sequences at random, each kept in its order (as one worker's are)."""
    live = [list(reversed(s)) for s in sequences if s]
    while live:
        i = rng.randrange(len(live))
        yield live[i].pop()
        if not live[i]:
            live.pop(i)


def drive(harness: Harness, count: int, seed: int, failure: float, noise: float) -> Workers:
    """Submit `count` artifacts and answer every job until all of them are over."""
    rng = random.Random(seed)
    workers = Workers(rng, failure)
    harness.send(
        *[(topics.presence(w), presence(w)) for w in WORKERS],
        (topics.presence("sched.initiator"), presence("sched.initiator", initiator=True)),
    )
    artifacts = [artifact(rng, n) for n in range(count)]
    for start in range(0, count, 100):
        harness.send(*[(topics.submit("wb"), a) for a in artifacts[start : start + 100]])
    for _ in range(200 * count):
        if not harness.core.artifacts:
            break
        if not harness.pending or rng.random() < 0.05:
            harness.tick()
            continue
        if rng.random() < noise / 50:  # a data worker goes offline, then comes back
            worker = rng.choice(WORKERS)
            harness.send((topics.presence(worker), presence(worker, online=False)))
            harness.send((topics.presence(worker), presence(worker)))
        answers = []
        for _ in range(rng.randint(1, 20)):
            if not harness.pending:
                break
            i = rng.randrange(len(harness.pending))
            harness.pending[i], harness.pending[-1] = harness.pending[-1], harness.pending[i]
            worker, ready = harness.pending.pop()
            answers.append(workers.answer(worker, ready))
        messages = list(interleave(rng, answers))
        harness.send(*messages)
        if messages and rng.random() < noise:  # delivered again: changes nothing
            assert_changes_nothing(harness.send(*rng.sample(messages, min(len(messages), 3))))
    return workers


def assert_changes_nothing(decision: Decision) -> None:
    assert decision.writes == []
    assert decision.statuses == []
    assert all(isinstance(message, EventAck) for _, message, _ in decision.publish)


def check_ends(harness: Harness, workers: Workers, count: int) -> None:
    """Every artifact is over; completed unless one of its jobs failed every attempt."""
    assert harness.core.artifacts == {}
    for n in range(count):
        artifact_id = f"a{n:05d}"
        row = harness.repository.artifact(artifact_id)
        assert row is not None and row.state in ARTIFACT_FINAL
        jobs = harness.repository.jobs(artifact_id)
        retries = row.artifact.steps[0].retries  # type: ignore[union-attr]
        exhausted = any(workers.failed[(artifact_id, j.job_id)] > retries for j in jobs)
        if exhausted:
            assert row.state is ArtifactState.FAILED and row.error is not None
        else:
            assert row.state is ArtifactState.COMPLETED, (artifact_id, row.error)
            assert all(j.state is JobState.COMPLETED for j in jobs)
            assert all((artifact_id, j.job_id) in harness.completed for j in jobs)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    failure=st.sampled_from([0.0, 0.1, 0.3]),
    noise=st.sampled_from([0.0, 0.2]),
)
def test_every_artifact_ends_under_random_interleavings(
    seed: int, failure: float, noise: float
) -> None:
    harness = Harness(scheduler_config(), seed)
    workers = drive(harness, 300, seed, failure, noise)
    check_ends(harness, workers, 300)


def test_thousands_of_artifacts_in_seconds() -> None:
    harness = Harness(scheduler_config())
    start = time.perf_counter()
    workers = drive(harness, 2000, seed=7, failure=0.05, noise=0.1)
    elapsed = time.perf_counter() - start
    check_ends(harness, workers, 2000)
    assert len(harness.completed) >= 2000 * 3
    assert elapsed < 60, f"2000 artifacts took {elapsed:.1f} s"


def test_a_stale_attempt_changes_nothing() -> None:
    harness = Harness(scheduler_config())
    drive(harness, 0, seed=0, failure=0.0, noise=0.0)
    harness.send(
        (
            topics.submit("wb"),
            Artifact(id="s", project=PROJECT, steps=[Finalize(NOOP, retries=1)]),
        )
    )
    worker, first = harness.pending.pop()
    error = RemoteError(type="Boom", message="first attempt")
    harness.send((topics.events(worker), JobFailed(job=first.ref, error=error, finished_at=2.0)))
    harness.tick()  # the retry's backoff (none here) is over: attempt 2 goes out
    worker, second = harness.pending.pop()
    assert second.attempt == 2
    late = JobFinished(job=first.ref, product=product(first.ref), started_at=1.0, finished_at=2.0)
    assert_changes_nothing(harness.send((topics.events(worker), late)))
    done = JobFinished(job=second.ref, product=product(second.ref), started_at=1.0, finished_at=2.0)
    harness.send((topics.events(worker), done))
    assert harness.state("s") is ArtifactState.COMPLETED


def test_the_deadline_fails_the_artifact_and_stops_its_jobs() -> None:
    harness = Harness(scheduler_config())
    drive(harness, 0, seed=0, failure=0.0, noise=0.0)
    slow = Artifact(id="d", project=PROJECT, steps=[Sequential(NOOP)], deadline=2.0)
    harness.send((topics.submit("wb"), slow))
    worker, ready = harness.pending.pop()
    harness.tick(1.0)
    assert harness.state("d") is ArtifactState.RUNNING
    decision = harness.tick(1.5)
    assert harness.state("d") is ArtifactState.FAILED
    row = harness.repository.artifact("d")
    assert row is not None and row.error is not None and row.error.type == "DeadlineExceeded"
    assert (topics.control(worker), CancelJob(job=ready.ref), False) in decision.publish


def test_a_job_over_its_timeout_is_stopped_and_retried() -> None:
    harness = Harness(scheduler_config())
    drive(harness, 0, seed=0, failure=0.0, noise=0.0)
    step = Sequential(NOOP, timeout=1.0, retries=1)
    harness.send((topics.submit("wb"), Artifact(id="t", project=PROJECT, steps=[step])))
    worker, ready = harness.pending.pop()
    harness.send((topics.events(worker), JobStarted(job=ready.ref, at=1.0)))
    decision = harness.tick(1.5)
    assert (topics.control(worker), CancelJob(job=ready.ref), False) in decision.publish
    harness.tick()
    _, again = harness.pending.pop()
    assert again.attempt == 2


def test_an_initiator_job_whose_node_goes_silent_runs_again_then_fails() -> None:
    harness = Harness(scheduler_config(heartbeat_grace=5.0, max_lost_attempts=2))
    drive(harness, 0, seed=0, failure=0.0, noise=0.0)
    harness.send((topics.submit("wb"), Artifact(id="i", project=PROJECT, steps=[Finalize(NOOP)])))
    for attempt in (1, 2):
        worker, ready = harness.pending.pop()
        assert worker == "sched.initiator" and ready.attempt == attempt
        harness.send((topics.events(worker), JobStarted(job=ready.ref, at=1.0)))
        beat = JobHeartbeat(jobs=[ready.ref], at=1.0)
        harness.tick(4.0)
        harness.send((topics.events(worker), beat))  # heard from in time: not lost
        harness.tick(4.0)
        assert harness.state("i") is ArtifactState.RUNNING
        harness.tick(2.0)  # silent for longer than the grace
        harness.tick()
    assert harness.state("i") is ArtifactState.FAILED
    row = harness.repository.artifact("i")
    assert row is not None and row.error is not None and row.error.type == "WorkerLost"


def test_a_resubmission_and_a_late_result_of_a_finished_artifact_are_answered() -> None:
    harness = Harness(scheduler_config())
    drive(harness, 1, seed=3, failure=0.0, noise=0.0)
    row = harness.repository.artifact("a00000")
    assert row is not None and row.state is ArtifactState.COMPLETED
    # Out of memory: its stored status is announced again as stored, and nothing written.
    decision = harness.send((topics.submit("wb"), row.artifact))
    assert decision.stored == ["a00000"] and decision.writes == []
    assert [(record.id, record.seq) for record, _ in decision.statuses] == [("a00000", row.seq)]
    again = harness.repository.artifact("a00000")
    assert again is not None and again.seq == row.seq
    ref = JobRef(artifact_id="a00000", job_id=0, attempt=1)
    late = JobFinished(job=ref, product=product(ref), started_at=1.0, finished_at=2.0)
    assert_changes_nothing(harness.send((topics.events("w0"), late)))
    harness.tick()  # the acknowledgement falls due: the worker stops re-sending
    acks = [m for t, m in harness.published if t == topics.control("w0")]
    assert any(isinstance(ack, EventAck) and ref in ack.jobs for ack in acks)


@pytest.mark.parametrize(
    ("topic", "payload", "named"),
    [
        (topics.submit("wb"), b'{"id": "x1", "project": "p", "steps": 3}', "x1"),
        (topics.submit("wb"), b"\xff not json", None),
        (topics.cancel("wb"), b'{"artifact_id": "x2", "reason": 7}', "x2"),
        (topics.cancel("wb"), b'{"artifact_id": "../x"}', None),
    ],
)
def test_a_rejection_names_the_artifact_its_request_named(
    topic: str, payload: bytes, named: str | None
) -> None:
    harness = Harness(scheduler_config())
    decision = harness.burst([Received(topic, payload, harness.now)])
    [(reply, rejection, _)] = decision.publish
    assert reply == topics.reply("wb")
    assert isinstance(rejection, RequestRejected) and rejection.artifact_id == named
