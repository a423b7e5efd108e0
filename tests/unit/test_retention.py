"""Retention in the scheduler's core, driven in memory with the core's test harness: a
prune removes exactly the final artifacts finished before its cutoff, rows and all, for
administrators only; a pruned id is then unknown; a large prune goes in batches and is
answered once through; the periodic prune needs no request."""

from __future__ import annotations

import random

from test_scheduler_core import NOOP, PROJECT, Harness, drive, product, scheduler_config

from flotta_mqtt.model import Artifact, ArtifactState, Finalize
from flotta_mqtt.protocol import (
    CancelArtifact,
    EventAck,
    JobFinished,
    JobReady,
    PruneReport,
    PruneRequest,
    RequestRejected,
    StatusRequest,
    topics,
)
from flotta_mqtt.scheduler.core import Policies, SchedulerCore
from flotta_mqtt.scheduler.effects import Decision, DeleteArtifact
from flotta_mqtt.scheduler.metrics import SchedulerMetrics
from flotta_mqtt.scheduler.retention import BATCH, period

ADMIN = "ops"


def site(**settings: float) -> Harness:
    """A harness whose scheduler has one admin, ADMIN, and workers online."""
    config = scheduler_config(**settings).model_copy(update={"admins": [ADMIN]})
    harness = Harness(config)
    drive(harness, 0, seed=0, failure=0.0, noise=0.0)  # the workers' presence
    return harness


def started(harness: Harness, *ids: str) -> list[tuple[str, JobReady]]:
    """Submit one-job artifacts with these ids; their jobs, as dispatched (to whom)."""
    steps = [Finalize(NOOP)]
    harness.send(
        *[(topics.submit("wb"), Artifact(id=i, project=PROJECT, steps=steps)) for i in ids]
    )
    dispatched = harness.pending[-len(ids) :]
    del harness.pending[-len(ids) :]
    return dispatched


def completed(harness: Harness, *ids: str) -> None:
    for worker, ready in started(harness, *ids):
        done = JobFinished(
            job=ready.ref, product=product(ready.ref), started_at=1.0, finished_at=2.0
        )
        harness.send((topics.events(worker), done))
    assert all(harness.state(i) is ArtifactState.COMPLETED for i in ids)


def prune(harness: Harness, older_than: float, client: str = ADMIN) -> Decision:
    return harness.send((topics.prune(client), PruneRequest(older_than=older_than)))


def pruned(decision: Decision) -> list[str]:
    """The ids a burst pruned (each is named with its owner, whose status topic it clears)."""
    return [artifact_id for _owner, artifact_id in decision.pruned]


def replies(decision: Decision, client: str = ADMIN) -> list[object]:
    return [message for topic, message, _ in decision.publish if topic == topics.reply(client)]


def test_a_prune_removes_the_final_artifacts_finished_before_its_cutoff_and_only_them() -> None:
    harness = site()
    started(harness, "running")  # the oldest of all, and never finished
    completed(harness, "old-1", "old-2")
    started(harness, "old-cancelled")
    harness.send((topics.cancel("wb"), CancelArtifact(artifact_id="old-cancelled")))
    harness.tick(100.0)
    completed(harness, "recent")
    decision = prune(harness, older_than=50.0)
    gone = ["old-1", "old-2", "old-cancelled"]
    assert sorted(pruned(decision)) == gone
    assert sorted(w.artifact_id for w in decision.writes if isinstance(w, DeleteArtifact)) == gone
    assert replies(decision) == [PruneReport(older_than=50.0, pruned=3, artifact_ids=gone)]
    repository = harness.repository
    assert set(repository.owners()) == {"running", "recent"}
    assert all(repository.artifact(i) is None and repository.jobs(i) == [] for i in gone)
    assert harness.state("running") is ArtifactState.RUNNING
    assert [len(repository.jobs(i)) for i in ("running", "recent")] == [1, 1]
    assert list(harness.core.artifacts) == ["running"]
    # Nothing more is that old: a second prune removes nothing.
    assert replies(prune(harness, older_than=50.0))[0] == PruneReport(
        older_than=50.0, pruned=0, artifact_ids=[]
    )


def test_a_pruned_id_is_unknown_and_its_late_results_are_acknowledged() -> None:
    harness = site()
    [(worker, ready)] = started(harness, "gone")
    late = JobFinished(job=ready.ref, product=product(ready.ref), started_at=1.0, finished_at=2.0)
    harness.send((topics.events(worker), late))
    harness.tick(10.0)
    assert pruned(prune(harness, older_than=5.0)) == ["gone"]
    asked = harness.send((topics.ask("wb"), StatusRequest(artifact_id="gone")))
    [rejection] = replies(asked, "wb")
    assert isinstance(rejection, RequestRejected) and rejection.reason == "unknown_artifact"
    assert asked.statuses == [] and asked.stored == []
    cancelled = harness.send((topics.cancel("wb"), CancelArtifact(artifact_id="gone")))
    [rejection] = replies(cancelled, "wb")
    assert isinstance(rejection, RequestRejected) and rejection.reason == "unknown_artifact"
    # The worker re-sends a result it was never acknowledged for: now it is.
    harness.send((topics.events(worker), late))
    harness.tick()
    acks = [m for t, m in harness.published if t == topics.control(worker)]
    assert sum(isinstance(a, EventAck) and ready.ref in a.jobs for a in acks) == 2


def test_only_admins_may_prune() -> None:
    harness = site()
    completed(harness, "kept")
    harness.tick(10.0)
    for client in ("wb", f"{ADMIN}x", ADMIN.upper()):
        decision = prune(harness, older_than=0.0, client=client)
        assert pruned(decision) == [] and decision.writes == []
        assert replies(decision, client) == [
            RequestRejected(
                topic=topics.prune(client),
                error=f"{client} may not prune: only the scheduler's admins may",
                reason="forbidden",
            )
        ]
    assert set(harness.repository.owners()) == {"kept"}
    # With no admins configured (the default), nobody may.
    nobody = Harness(scheduler_config())
    [rejection] = replies(prune(nobody, older_than=0.0))
    assert isinstance(rejection, RequestRejected) and rejection.reason == "forbidden"


def test_a_large_prune_goes_in_batches_and_is_answered_once_through() -> None:
    harness = site()
    ids = [f"a{n:04d}" for n in range(2 * BATCH + 5)]
    completed(harness, *ids)
    harness.tick(10.0)
    first = prune(harness, older_than=5.0)
    assert len(pruned(first)) == BATCH and replies(first) == []
    assert harness.core.next_prune_due() == 0.0  # the service comes back at once
    second = harness.burst([])
    assert len(pruned(second)) == BATCH and replies(second) == []
    last = harness.burst([])
    [report] = replies(last)
    assert isinstance(report, PruneReport) and report.pruned == len(ids)
    assert len(report.artifact_ids) == 100 and set(report.artifact_ids) <= set(ids)
    assert sorted(pruned(first) + pruned(second) + pruned(last)) == ids
    assert set(harness.repository.owners()) == set()
    assert harness.core.next_prune_due() is None


def test_the_periodic_prune_needs_no_request() -> None:
    harness = site(prune_older_than=60.0)
    completed(harness, "p")
    harness.tick(30.0)
    assert set(harness.repository.owners()) == {"p"}  # finished 30 s ago: kept
    due = harness.core.next_prune_due()
    assert due is not None and due <= harness.now + period(60.0)
    decision = harness.tick(31.0)
    assert pruned(decision) == ["p"] and decision.publish == []
    assert set(harness.repository.owners()) == set()
    assert harness.core.next_prune_due() == harness.now + period(60.0)


def test_a_restarted_scheduler_prunes_by_when_artifacts_finished() -> None:
    harness = site()
    completed(harness, "early")
    finished_at = harness.wall
    harness.tick(100.0)
    harness.send((topics.ask("wb"), StatusRequest(artifact_id="early")))  # announced again
    repository = harness.repository
    assert repository.finished_artifacts() == {"early": finished_at}
    policies = Policies.of(harness.config, random.Random(0))
    harness.core = SchedulerCore(harness.config, SchedulerMetrics(), policies)
    harness.core.restore(
        repository.nodes(),
        repository.owners(),
        repository.finished_artifacts(),
        [],
        harness.clock(),
    )
    assert pruned(prune(harness, older_than=99.0)) == ["early"]
