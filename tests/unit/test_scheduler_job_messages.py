"""A job's message in the scheduler's core, driven in memory: a workbench whose name
cannot be a tenant is refused at submission, and a message that cannot be built fails
its artifact, not the scheduler at every later burst."""

from __future__ import annotations

import random

from test_scheduler_core import Harness, product, scheduler_config

from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    Registry,
    Task,
    Tasks,
    WorkbenchEntry,
    WorkerEntry,
)
from flotta_mqtt.protocol import (
    JobFailed,
    JobFinished,
    JobReady,
    NodePresence,
    RemoteError,
    RequestRejected,
    topics,
)
from flotta_mqtt.scheduler.core import Policies, SchedulerCore
from flotta_mqtt.scheduler.metrics import SchedulerMetrics
from flotta_mqtt.scheduler.records import restore

REGISTRY = Registry(
    scheduler="sched",
    workers={"w0": WorkerEntry(projects=["p"], executors=["shell"])},
    workbenches={"bob": WorkbenchEntry(tenant="oncology")},
)
SHELL = {"shell": "true"}


def workflow(artifact_id: str, first_cached: bool = True) -> Artifact:
    """A cached task after another: the second's message needs its owner's tenant."""
    tasks = [
        Task(name="a", params=SHELL, cache=first_cached),
        Task(name="b", params=SHELL, depends=["a"], cache=True),
    ]
    return Artifact(id=artifact_id, project="p", steps=[Tasks(tasks=tasks)])


def started(registry: Registry | None) -> Harness:
    harness = Harness(scheduler_config(), registry=registry)
    online(harness)
    return harness


def online(harness: Harness) -> None:
    harness.send(
        (
            topics.presence("w0"),
            NodePresence(node="w0", online=True, projects=["p"], executors=["shell"], since=1),
        ),
        (
            topics.presence("sched.initiator"),
            NodePresence(node="sched.initiator", online=True, initiator=True, since=1.0),
        ),
    )


def sent(harness: Harness, artifact_id: str) -> list[JobReady]:
    return [r for _, r in harness.pending if r.artifact_id == artifact_id]


def finish(harness: Harness, ready: JobReady) -> None:
    done = JobFinished(job=ready.ref, product=product(ready.ref), started_at=1, finished_at=2)
    harness.send((topics.events("w0"), done))


def test_a_workbench_whose_name_is_no_id_is_refused_at_submission() -> None:
    harness = started(REGISTRY)
    harness.send(
        (topics.submit("alice@lab"), workflow("a1")), (topics.submit("bob"), workflow("b1"))
    )
    rejections = [m for _, m in harness.published if isinstance(m, RequestRejected)]
    assert [(r.artifact_id, r.reason) for r in rejections] == [("a1", "forbidden")]
    assert "workbench 'alice@lab' is not registered and its name is not an id" in (
        rejections[0].error
    )
    assert harness.repository.artifact("a1") is None, "nothing recorded"
    assert [r.cache_scope for r in sent(harness, "b1")] == ["oncology"], "others go on"


def test_a_message_that_cannot_be_built_fails_its_artifact_not_the_scheduler() -> None:
    """An artifact recorded before its owner's name was checked (here: with no registry),
    taken up by a scheduler with one: its cached task's message cannot name a tenant."""
    harness = started(None)
    harness.send((topics.submit("alice@lab"), workflow("a1", first_cached=False)))
    [first] = sent(harness, "a1")
    row = harness.repository.artifact("a1")
    assert row is not None
    record = restore(row, harness.repository.jobs("a1"))
    config = scheduler_config()
    policies = Policies.of(config, random.Random(0))
    harness.core = SchedulerCore(config, SchedulerMetrics(), policies, REGISTRY)
    harness.registry = REGISTRY
    harness.pending.clear()
    harness.check(
        harness.core.restore(
            harness.repository.nodes(), {"a1": "alice@lab"}, {}, [record], harness.clock()
        )
    )
    online(harness)
    harness.send((topics.submit("bob"), workflow("b1")))
    finish(harness, first)  # task b is due: its message cannot be built
    assert harness.state("a1") is ArtifactState.FAILED
    row = harness.repository.artifact("a1")
    assert row is not None and row.error is not None and row.error.type == "InvalidJob"
    assert row.error.message.startswith("job 1 cannot be sent: cache_scope: String should")
    harness.tick()  # no error raised out of the burst, and the others go on
    [bob] = sent(harness, "b1")
    finish(harness, bob)
    assert [r.operation.params["name"] for r in sent(harness, "b1")] == ["a", "b"]


def test_a_restored_job_whose_message_cannot_be_built_fails_its_artifact() -> None:
    harness = started(None)
    harness.send((topics.submit("alice@lab"), workflow("a1")))
    assert len(sent(harness, "a1")) == 1
    row = harness.repository.artifact("a1")
    assert row is not None
    record = restore(row, harness.repository.jobs("a1"))
    config = scheduler_config()
    policies = Policies.of(config, random.Random(0))
    harness.core = SchedulerCore(config, SchedulerMetrics(), policies, REGISTRY)
    decision = harness.core.restore([], {"a1": "alice@lab"}, {}, [record], harness.clock())
    assert not [m for _, m, _ in decision.publish if isinstance(m, JobReady)]
    assert record.state is ArtifactState.FAILED
    assert record.error is not None and record.error.type == "InvalidJob"


def test_jobs_due_together_after_one_could_not_be_sent_are_left_alone() -> None:
    """Two retries due at one tick: the first's message fails the artifact, and the second
    is not dispatched (its job cancelled with the artifact), nor does the tick raise."""
    harness = started(None)
    tasks = [Task(name=name, params=SHELL, cache=True, retries=1) for name in ("a", "b")]
    harness.send(
        (topics.submit("alice@lab"), Artifact(id="a1", project="p", steps=[Tasks(tasks=tasks)]))
    )
    first = sent(harness, "a1")
    assert len(first) == 2
    # As under a registry that did not check its workbenches' names when they submitted.
    harness.core.flow.tenant_of = lambda client: client
    error = RemoteError(type="TaskError", message="exit 1")
    harness.send(
        *(
            (topics.events("w0"), JobFailed(job=r.ref, error=error, started_at=1, finished_at=2))
            for r in first
        )
    )
    harness.tick()
    assert harness.state("a1") is ArtifactState.FAILED
    assert [r.attempt for r in sent(harness, "a1")] == [1, 1], "no second attempt sent"
