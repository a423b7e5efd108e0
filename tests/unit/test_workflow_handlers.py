"""Skipped tasks and exit handlers in the scheduler's core, driven in memory: a skipped
task releases its dependents; `on_exit` tasks wait for every other task and run whatever
happened, `on_failure` ones only after a failure (else they are skipped), the artifact
still ends failed; and a scheduler restored from its database mid-way goes on the same."""

from __future__ import annotations

import random

from test_scheduler_core import Harness, product, scheduler_config

from flotta_mqtt.model import Artifact, ArtifactState, JobState, Tasks, Workflow
from flotta_mqtt.protocol import (
    JobFailed,
    JobFinished,
    JobReady,
    NodePresence,
    RemoteError,
    topics,
)
from flotta_mqtt.scheduler.core import Policies, SchedulerCore
from flotta_mqtt.scheduler.metrics import SchedulerMetrics
from flotta_mqtt.scheduler.records import restore

WORKFLOW = Workflow.model_validate(
    {
        "tasks": [
            {"name": "a", "params": {"shell": "true"}},
            {"name": "b", "depends": ["a"], "params": {"shell": "true"}},
            {"name": "c", "depends": ["b"], "params": {"shell": "true"}},
            {"name": "side", "params": {"shell": "true"}},
        ],
        "on_exit": [{"name": "cleanup", "params": {"shell": "true"}}],
        "on_failure": [
            {"name": "alarm", "params": {"shell": "true"}},
            {"name": "page", "depends": ["alarm"], "params": {"shell": "true"}},
        ],
    }
)


def started() -> Harness:
    harness = Harness(scheduler_config())
    harness.send(
        (
            topics.presence("w0"),
            NodePresence(node="w0", online=True, executors=["shell"], since=1.0),
        ),
        (
            topics.presence("sched.initiator"),
            NodePresence(node="sched.initiator", online=True, initiator=True, since=1.0),
        ),
    )
    artifact = Artifact(id="wf", project="p", steps=[Tasks(tasks=WORKFLOW.all_tasks())])
    harness.send((topics.submit("wb"), artifact))
    return harness


def names(harness: Harness) -> dict[str, JobState]:
    graph = harness.graphs["wf"]
    return {
        graph.jobs[j.job_id].operation.params["name"]: j.state
        for j in harness.repository.jobs("wf")
    }


def answer(harness: Harness, name: str, *, fail: bool = False, skipped: str | None = None) -> None:
    """The pending JobReady of task `name`, answered."""
    ready: JobReady = next(r for _, r in harness.pending if r.operation.params["name"] == name)
    harness.pending = [(w, r) for w, r in harness.pending if r is not ready]
    message: JobFinished | JobFailed
    if fail:
        error = RemoteError(type="TaskError", message=f"task {name} exited with status 1")
        message = JobFailed(job=ready.ref, error=error, started_at=1.0, finished_at=2.0)
    else:
        message = JobFinished(
            job=ready.ref,
            product=product(ready.ref),
            started_at=1.0,
            finished_at=2.0,
            skipped=skipped,
        )
    harness.send((topics.events("w0"), message))


def told(harness: Harness, name: str) -> str | None:
    """The workflow status the scheduler gave task `name`'s pending job."""
    ready = next(r for _, r in harness.pending if r.operation.params["name"] == name)
    status: str | None = ready.operation.params.get("workflow_status")
    return status


def pending(harness: Harness) -> list[str]:
    return sorted(r.operation.params["name"] for _, r in harness.pending)


def test_on_success_on_exit_runs_last_and_on_failure_is_skipped() -> None:
    harness = started()
    assert pending(harness) == ["a", "side"], "handlers wait for the other tasks"
    assert told(harness, "a") is None, "only exit handlers are told"
    answer(harness, "a")
    answer(harness, "b", skipped="when: false is false")  # skipped: done for its dependents
    assert pending(harness) == ["c", "side"]
    answer(harness, "c")
    assert pending(harness) == ["side"]
    answer(harness, "side")
    assert pending(harness) == ["cleanup"]
    assert told(harness, "cleanup") == "Succeeded"
    states = names(harness)
    assert (states["b"], states["alarm"], states["page"]) == (JobState.SKIPPED,) * 3
    answer(harness, "cleanup")
    assert harness.state("wf") is ArtifactState.COMPLETED


def test_after_a_failure_both_handlers_run_and_the_artifact_fails() -> None:
    harness = started()
    answer(harness, "a", fail=True)
    assert names(harness)["b"] is JobState.CANCELLED
    assert pending(harness) == ["side"], "no handler before every other task is final"
    answer(harness, "side")
    assert pending(harness) == ["alarm", "cleanup"]
    assert (told(harness, "alarm"), told(harness, "cleanup")) == ("Failed", "Failed")
    answer(harness, "alarm")
    answer(harness, "cleanup")
    assert pending(harness) == ["page"]
    answer(harness, "page")
    assert harness.state("wf") is ArtifactState.FAILED
    row = harness.repository.artifact("wf")
    assert row is not None and row.error is not None and "task a exited" in row.error.message


def test_a_restored_scheduler_runs_the_handlers_it_had_started() -> None:
    harness = started()
    answer(harness, "a", fail=True)
    answer(harness, "side")
    assert pending(harness) == ["alarm", "cleanup"]
    # The scheduler stops; a new one takes up what its database holds.
    row = harness.repository.artifact("wf")
    assert row is not None
    record = restore(row, harness.repository.jobs("wf"))
    config = scheduler_config()
    harness.core = SchedulerCore(config, SchedulerMetrics(), Policies.of(config, random.Random(0)))
    harness.pending.clear()
    decision = harness.core.restore(
        harness.repository.nodes(), {"wf": "wb"}, {}, [record], harness.clock()
    )
    harness.check(decision)
    for topic, message, _ in decision.publish:
        if isinstance(message, JobReady):
            harness.pending.append((topics.parse(topic).name, message))
    assert pending(harness) == ["alarm", "cleanup"], "asked again, nothing else"
    answer(harness, "alarm")
    answer(harness, "cleanup")
    answer(harness, "page")
    assert harness.state("wf") is ArtifactState.FAILED
