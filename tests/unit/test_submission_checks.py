"""What the scheduler refuses at submission rather than at run time, through a workbench's
Client on the in-memory transport: the artifact fails at once with a reason saying why,
and no job is dispatched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flotta_mqtt import Artifact, Client, Collect, Finalize, Iterate, Operation, Parallel
from flotta_mqtt.model import (
    ArtifactState,
    Job,
    NodeRef,
    SchedulerContext,
    SecureAggregation,
    Task,
    Tasks,
    Workflow,
    bind,
)
from flotta_mqtt.model.query import IsIn
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import (
    MAX_MESSAGE_BYTES,
    JobReady,
    NodePresence,
    ProtocolError,
    encode,
    serialize,
)
from flotta_mqtt.scheduler.binding import Bound, Refused, bind_artifact
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.scheduler.job_messages import job_sizes
from flotta_mqtt.scheduler.membership import Members
from flotta_mqtt.transport.memory import fresh_memory_broker
from flotta_mqtt.transport.settings import StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

TIMEOUT = 20.0
ROWS = [i / 10 for i in range(10)]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    """A workbench beside a scheduler and one worker holding project `demo`."""
    broker = fresh_memory_broker("checks").broker_settings()
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    config = SchedulerConfig(
        broker=broker,
        storage=storage,
        database=tmp_path / "scheduler.db",
        worker_grace=60.0,  # longer than TIMEOUT: a refusal must not wait for it
    )
    node = SchedulerNode(config).start(wait=TIMEOUT)
    data = tmp_path / "w0.csv"
    data.write_text("x\n" + "".join(f"{x}\n" for x in ROWS))
    worker = WorkerAgent(
        WorkerConfig(
            name="w0",
            broker=broker,
            storage=storage,
            datasets={"demo": {"paths": [data], "privacy": {"exact": True}}},
            state_dir=tmp_path / "w0.state",
        )
    ).start(wait=TIMEOUT)
    try:
        with Client(broker, storage=storage) as workbench:
            yield workbench
    finally:
        worker.stop()
        node.stop()


def test_an_iterated_estimator_is_refused_saying_why(client: Client) -> None:
    count = Operation(name="count")
    artifact = Artifact(
        project="demo", steps=[Iterate(2, [Parallel(count, Collect()), Finalize(count)])]
    )
    status = client.submit(artifact).wait(timeout=TIMEOUT)
    assert status.state is ArtifactState.FAILED
    assert status.error is not None
    assert "'count' cannot be iterated" in status.error.message
    assert "round 1's result" in status.error.message
    assert status.counts.get("completed", 0) == 0  # refused before any job ran


def test_one_round_of_an_estimator_still_runs(client: Client) -> None:
    count = Operation(name="count")
    artifact = Artifact(
        project="demo", steps=[Iterate(1, [Parallel(count, Collect()), Finalize(count)])]
    )
    assert client.submit(artifact).result(timeout=TIMEOUT) == len(ROWS)


def padded(size: int) -> Artifact:
    """A one-step count of exactly `size` bytes as submitted, padded in its filter."""

    def count(pad: str) -> Artifact:
        where = IsIn(column="x", values=[pad]).model_dump()
        steps = [Parallel(Operation(name="count", params={"where": where}))]
        return Artifact(id="padded", project="demo", seed=1, steps=steps)

    return count("x" * (size - len(encode(count("")))))


def test_an_artifact_whose_first_job_would_be_too_large_is_refused_naming_the_limit(
    client: Client,
) -> None:
    # It fits in a submission, but its job's message (the same operation with the job's
    # own fields) does not: nothing could ever be dispatched.
    artifact = padded(MAX_MESSAGE_BYTES)
    assert len(encode(artifact)) == MAX_MESSAGE_BYTES
    status = client.submit(artifact).wait(timeout=TIMEOUT)
    assert status.state is ArtifactState.FAILED
    assert status.error is not None and status.error.type == "MessageTooLarge"
    assert f"{MAX_MESSAGE_BYTES}-byte limit" in status.error.message


def test_an_artifact_itself_too_large_is_refused_by_the_client(client: Client) -> None:
    with pytest.raises(ProtocolError, match=f"{MAX_MESSAGE_BYTES}-byte limit"):
        client.submit(padded(MAX_MESSAGE_BYTES + 1))


def test_a_job_collecting_too_many_products_is_refused_naming_its_inputs() -> None:
    holders = {
        f"w{i}": NodePresence(
            node=f"w{i}", online=True, projects=["demo"], operations=["count"], since=1.0
        )
        for i in range(2000)
    }
    count = Operation(name="count")
    artifact = Artifact(project="demo", steps=[Parallel(count, Collect()), Finalize(count)])
    outcome = bind_artifact(artifact, holders, "initiator", Members(sorted(holders), []))
    assert isinstance(outcome, Refused) and outcome.kind == "MessageTooLarge"
    assert "job 2000 (step 1)" in outcome.message and "its 2000 inputs" in outcome.message
    assert f"{MAX_MESSAGE_BYTES}-byte limit" in outcome.message


# What dispatch may add to a job's message at most: see scheduler/job_messages.py.
WIDEST_ATTEMPT = 2**63 - 1
WIDEST_SCOPE = "t" * 128
SITES = [NodeRef(id="w0"), NodeRef(id="w1")]
POOL = [NodeRef(id="w0", executors=["shell"])]


def as_sent(job: Job, attempt: int, scope: str, outcome: str) -> bytes:
    """A job's message as the scheduler sends it, built here as a worker reads it."""
    params = job.operation.params
    if job.handler is not None:
        params = {**params, "workflow_status": outcome}
    cached = job.kind == "tasks" and params.get("cache") is True
    return serialize(
        JobReady(
            artifact_id="sizes",
            job_id=job.id,
            attempt=attempt,
            project="demo",
            seed=1,
            step=job.step,
            kind=job.kind,
            role=job.role,
            iteration=job.iteration,
            operation=Operation(name=job.operation.name, params=params),
            cache_scope=scope if cached else None,
        )
    )


def every_kind(pad: str = "") -> Artifact:
    """Jobs of every kind: tasks plain, cached, fanned out and exit handlers, and the
    steps of an Iterate of more than ten rounds, a secure one among them."""
    flow = Workflow.model_validate(
        {
            "tasks": [
                {"name": "plain", "params": {"shell": f"echo {pad}"}},
                {"name": "cached", "params": {"shell": "true"}, "cache": True},
                {
                    "name": "fan",
                    "params": {"shell": "echo {{ item }}"},
                    "for_each": {"items": [1, "ab", [3]]},
                },
            ],
            "on_exit": [{"name": "bye", "params": {"shell": "true"}, "cache": True}],
        }
    )
    mean = Operation(name="mean", params={"column": "x"})
    rounds = Iterate(
        12,
        [
            Parallel(mean, Collect(), secure=SecureAggregation()),
            Finalize(mean),
        ],
    )
    return Artifact(
        id="sizes", project="demo", seed=1, steps=[Tasks(tasks=flow.all_tasks()), rounds]
    )


def test_the_size_check_counts_the_largest_message_each_job_can_be_sent_as() -> None:
    context = SchedulerContext(initiator=NodeRef(id="initiator"), workers=SITES, pool=POOL)
    artifact = every_kind()
    graph = bind(artifact, context)
    kinds = {(job.kind, job.handler is not None, job.iteration >= 10) for job in graph.jobs}
    assert {("tasks", True, False), ("parallel", False, True), ("finalize", False, True)} <= kinds
    sizes = list(job_sizes(artifact, graph))
    assert [job.id for job, _ in sizes] == [job.id for job in graph.jobs]
    for job, size in sizes:
        assert size == len(as_sent(job, WIDEST_ATTEMPT, WIDEST_SCOPE, "Succeeded")), job
        assert size >= len(as_sent(job, 1, "*", "Failed")), job


@settings(max_examples=40, deadline=None)
@given(
    replicas=st.integers(min_value=1, max_value=12),
    env=st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True), st.text()),
    cache=st.booleans(),
    over=st.booleans(),
)
def test_a_task_is_refused_exactly_when_one_of_its_jobs_could_be_over_the_limit(
    replicas: int, env: dict[str, str], cache: bool, over: bool
) -> None:
    """Each job of a task is measured (their names, ids and params differ), to the byte,
    as the largest message it can be sent as."""
    holders = {
        "w0": NodePresence(node="w0", online=True, projects=["demo"], executors=["shell"], since=1)
    }

    def outcome(pad: str) -> Bound | Refused:
        task = Task(
            name="t", params={"command": ["echo", pad]}, env=env, replicas=replicas, cache=cache
        )
        artifact = Artifact(id="sizes", project="demo", seed=1, steps=[Tasks(tasks=[task])])
        return bind_artifact(artifact, holders, "initiator", Members(["w0"], []))

    bound = outcome("")
    assert isinstance(bound, Bound)
    widest = max(
        len(as_sent(job, WIDEST_ATTEMPT, WIDEST_SCOPE, "Succeeded")) for job in bound.graph.jobs
    )
    refused = outcome("x" * (MAX_MESSAGE_BYTES - widest + over))
    assert isinstance(refused, Refused) == over
    assert not isinstance(refused, Refused) or refused.kind == "MessageTooLarge"
