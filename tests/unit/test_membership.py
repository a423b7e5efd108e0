"""Membership: an artifact binds to every holder the operator registered, never to a node
that only claims to hold data; a quorum proceeds with the holders online and says who is
left out; a holder that never answers fails the artifact at its deadline, named."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from test_scheduler_core import NOOP, PROJECT, Harness, presence, product, scheduler_config

from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    Collect,
    Finalize,
    Parallel,
    Registry,
    WorkerEntry,
)
from flotta_mqtt.protocol import ArtifactStatus, JobFinished, NodePresence, topics
from flotta_mqtt.scheduler.announcements import build_status
from flotta_mqtt.scheduler.membership import admit, quorum_size

REGISTRY = Registry(
    scheduler="sched",
    workers={
        "a": WorkerEntry(projects=[PROJECT]),
        "b": WorkerEntry(projects=[PROJECT]),
        "tasks": WorkerEntry(executors=["shell"]),
    },
)


def count_artifact(artifact_id: str, **fields: object) -> Artifact:
    steps = [Parallel(NOOP, Collect()), Finalize(NOOP)]
    return Artifact(id=artifact_id, project=PROJECT, steps=steps, **fields)  # type: ignore[arg-type]


def started(harness: Harness, *online: str) -> Harness:
    harness.send(
        *[(topics.presence(w), presence(w)) for w in online],
        (topics.presence("sched.initiator"), presence("sched.initiator", initiator=True)),
    )
    return harness


def dispatched_to(harness: Harness, artifact_id: str) -> set[str]:
    return {worker for worker, ready in harness.pending if ready.artifact_id == artifact_id}


def answer_all(harness: Harness) -> None:
    """Finish every job sent so far (and those their completion makes ready)."""
    while harness.pending:
        worker, ready = harness.pending.pop(0)
        done = JobFinished(
            job=ready.ref, product=product(ready.ref), started_at=1.0, finished_at=2.0
        )
        harness.send((topics.events(worker), done))


def status(harness: Harness, artifact_id: str) -> ArtifactStatus:
    statuses = [record for record, _ in harness.core.flow.decision.statuses]
    assert statuses == []  # the burst is over: read what the last one recorded
    row = harness.repository.artifact(artifact_id)
    assert row is not None
    record = harness.core.artifacts.get(artifact_id)
    if record is not None:
        return build_status(record, harness.wall, True, lambda _i, _r: None)
    raise AssertionError("only unfinished artifacts are read here")


def test_an_artifact_binds_to_every_registered_holder_even_one_not_yet_heard_from() -> None:
    harness = started(Harness(scheduler_config(), registry=REGISTRY), "a")
    harness.send((topics.submit("wb"), count_artifact("x")))
    assert dispatched_to(harness, "x") == {"a", "b"}
    assert status(harness, "x").holders == ["a", "b"]
    assert status(harness, "x").missing == []
    # a's part alone never completes it: b's job waits for b (store-and-forward).
    first = [(w, r) for w, r in harness.pending if w == "a"]
    harness.pending = [(w, r) for w, r in harness.pending if w != "a"]
    for worker, ready in first:
        harness.send(
            (
                topics.events(worker),
                JobFinished(
                    job=ready.ref, product=product(ready.ref), started_at=1.0, finished_at=2.0
                ),
            )
        )
    harness.tick()
    assert harness.state("x") is ArtifactState.RUNNING
    harness.send((topics.presence("b"), presence("b")))  # b comes online: its job is re-sent
    assert "b" in dispatched_to(harness, "x")
    answer_all(harness)
    assert harness.state("x") is ArtifactState.COMPLETED


def test_a_node_the_registry_does_not_name_is_given_nothing() -> None:
    harness = started(Harness(scheduler_config(), registry=REGISTRY), "a", "b", "intruder")
    harness.send((topics.submit("wb"), count_artifact("x")))
    assert dispatched_to(harness, "x") == {"a", "b"}
    assert "intruder" not in harness.core.nodes


def test_a_presence_claims_no_more_than_the_registry_grants() -> None:
    claim = NodePresence(
        node="tasks",
        online=True,
        projects=[PROJECT, "other"],
        executors=["shell", "python", "api"],
        since=1.0,
    )
    admitted = admit(claim, REGISTRY, "sched.initiator")
    assert admitted is not None
    assert admitted.projects == [] and admitted.executors == ["shell"]
    coder = Registry(workers={"tasks": WorkerEntry(executors=["shell"], allow_code=True)})
    admitted = admit(claim, coder, "sched.initiator")
    assert admitted is not None and admitted.executors == ["shell", "python"]
    # Only the scheduler's own initiator may say it is one.
    fake = NodePresence(node="mallory", online=True, initiator=True, since=1.0)
    assert admit(fake, REGISTRY, "sched.initiator") is None


def test_a_quorum_proceeds_with_the_holders_online_and_names_the_missing() -> None:
    harness = started(Harness(scheduler_config(), registry=REGISTRY), "a")
    harness.send((topics.submit("wb"), count_artifact("q", quorum=1)))
    assert dispatched_to(harness, "q") == {"a"}
    assert status(harness, "q").holders == ["a"]
    assert status(harness, "q").missing == ["b"]
    answer_all(harness)
    assert harness.state("q") is ArtifactState.COMPLETED


def test_a_quorum_waits_for_enough_holders_then_binds_to_those_online() -> None:
    harness = started(Harness(scheduler_config(), registry=REGISTRY))
    harness.send((topics.submit("wb"), count_artifact("q", quorum=0.5)))
    harness.tick()
    assert dispatched_to(harness, "q") == set()
    assert harness.state("q") is ArtifactState.SUBMITTED
    harness.send((topics.presence("b"), presence("b")))
    assert dispatched_to(harness, "q") == {"b"}
    assert status(harness, "q").missing == ["a"]


def test_a_quorum_larger_than_the_registered_holders_fails_at_once() -> None:
    harness = started(Harness(scheduler_config(), registry=REGISTRY), "a", "b")
    harness.send((topics.submit("wb"), count_artifact("q", quorum=3)))
    row = harness.repository.artifact("q")
    assert row is not None and row.state is ArtifactState.FAILED
    assert row.error is not None and row.error.type == "QuorumUnreachable"
    assert "2 registered holders" in row.error.message


def test_a_quorum_never_reached_fails_at_the_deadline_naming_the_silent() -> None:
    harness = started(Harness(scheduler_config(), registry=REGISTRY), "a")
    harness.send((topics.submit("wb"), count_artifact("q", quorum=2, deadline=5)))
    harness.tick(6)
    row = harness.repository.artifact("q")
    assert row is not None and row.state is ArtifactState.FAILED
    assert row.error is not None and row.error.type == "DeadlineExceeded"
    assert "1 of 2 online; silent: b" in row.error.message


def test_a_holder_that_never_answers_fails_the_artifact_at_its_deadline_named() -> None:
    harness = started(Harness(scheduler_config(), registry=REGISTRY), "a")
    harness.send((topics.submit("wb"), count_artifact("x", deadline=5)))
    harness.pending = [(w, r) for w, r in harness.pending if w == "a"]
    answer_all(harness)
    harness.tick(6)
    row = harness.repository.artifact("x")
    assert row is not None and row.state is ArtifactState.FAILED
    assert row.error is not None and row.error.type == "DeadlineExceeded"
    assert "holders that did not answer: b (offline)" in row.error.message


def test_without_a_deadline_the_scheduler_default_one_applies() -> None:
    config = scheduler_config(default_deadline=60.0)
    harness = started(Harness(config, registry=REGISTRY), "a")
    harness.send((topics.submit("wb"), count_artifact("x")))
    harness.tick(30)
    assert harness.state("x") is ArtifactState.RUNNING
    harness.tick(31)
    assert harness.state("x") is ArtifactState.FAILED


def test_quorum_must_be_a_count_or_a_fraction() -> None:
    for bad in (0, -1, 0.0, 1.5):
        with pytest.raises(ValidationError):
            count_artifact("q", quorum=bad)


@given(fraction=st.floats(min_value=1e-6, max_value=1.0), expected=st.integers(0, 10_000))
def test_a_fractional_quorum_asks_for_at_least_one_and_at_most_all(
    fraction: float, expected: int
) -> None:
    need = quorum_size(fraction, expected)
    assert 1 <= need <= max(expected, 1)
    assert need >= fraction * expected


def test_a_registry_names_each_node_once() -> None:
    with pytest.raises(ValidationError, match="named more than once: a"):
        Registry(workers={"a": WorkerEntry()}, workbenches={"a": {}})  # type: ignore[dict-item]


def test_a_worker_serving_some_tenants_takes_no_part_in_another_tenants_artifacts() -> None:
    registry = Registry(
        scheduler="sched",
        workers={
            "a": WorkerEntry(projects=[PROJECT], tenants=["oncology"]),
            "b": WorkerEntry(projects=[PROJECT]),
            "coder": WorkerEntry(executors=["shell"], tenants=["oncology"]),
        },
        workbenches={"alice": {"tenant": "oncology"}, "bob": {"tenant": "cardiology"}},  # type: ignore[dict-item]
    )
    harness = started(Harness(scheduler_config(), registry=registry), "a", "b")
    harness.send((topics.submit("alice"), count_artifact("onc")))
    harness.send((topics.submit("bob"), count_artifact("card")))
    assert dispatched_to(harness, "onc") == {"a", "b"}
    assert dispatched_to(harness, "card") == {"b"}
    assert status(harness, "card").holders == ["b"]
