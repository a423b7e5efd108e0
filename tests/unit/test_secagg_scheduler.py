"""The scheduler's side of secure aggregation: a site silent past its round's dropout
leaves the round, its later rounds with it, and the other sites go on without it; a
scheduler restored from its database keeps it out."""

from __future__ import annotations

from test_scheduler_core import PROJECT, WORKERS, Harness, product, scheduler_config

from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    Collect,
    Finalize,
    JobState,
    Operation,
    Parallel,
    SecureAggregation,
)
from flotta_mqtt.protocol import CancelJob, JobFinished, JobReady, NodePresence, topics
from flotta_mqtt.scheduler.records import restore

COUNT = Operation(name="count")
OPERATIONS = ["count", *(f"secagg.{r}" for r in ("keys", "share", "mask", "reveal", "unmask"))]
INITIATOR = "sched.initiator"


def online(harness: Harness) -> None:
    harness.send(
        *[
            (
                topics.presence(node),
                NodePresence(
                    node=node,
                    online=True,
                    initiator=node == INITIATOR,
                    projects=[] if node == INITIATOR else [PROJECT],
                    operations=OPERATIONS,
                    since=1.0,
                ),
            )
            for node in (*WORKERS, INITIATOR)
        ]
    )


def answer(
    harness: Harness, keep: set[tuple[str, str]] = frozenset()
) -> list[tuple[str, JobReady]]:
    """Finish every job out now but those of (worker, operation) in `keep`; return those."""
    kept = []
    batch, harness.pending[:] = list(harness.pending), []  # the jobs out now, one round
    for worker, ready in batch:
        if (worker, ready.operation.name) in keep:
            kept.append((worker, ready))
            continue
        finished = JobFinished(
            job=ready.ref, product=product(ready.ref), started_at=1.0, finished_at=2.0
        )
        harness.send((topics.events(worker), finished))
    return kept


def secure_artifact() -> Artifact:
    step = Parallel(COUNT, Collect(), secure=SecureAggregation(dropout=5.0))
    return Artifact(id="s", project=PROJECT, steps=[step, Finalize(COUNT)])


def test_a_site_silent_past_the_dropout_leaves_the_round_and_the_others_finish() -> None:
    harness = Harness(scheduler_config())
    online(harness)
    harness.send((topics.submit("wb"), secure_artifact()))
    answer(harness)  # every site advertised its keys
    ((worker, dealing),) = answer(harness, keep={("w1", "secagg.share")})
    assert worker == "w1"
    harness.tick(4.0)
    assert not harness.pending  # the masked inputs wait for w1's shares, within the dropout
    decision = harness.tick(2.0)
    assert (topics.control("w1"), CancelJob(job=dealing.ref), False) in decision.publish
    graph = harness.graphs["s"]
    rows = {row.job_id: row for row in harness.repository.jobs("s")}
    w1 = [job.id for job in graph if job.worker == "w1"]
    assert [rows[j].state for j in w1] == [JobState.COMPLETED] + [JobState.CANCELLED] * 3
    assert all(rows[j].error and rows[j].error.type == "DroppedOut" for j in w1[1:])
    assert "within the round's dropout of 5.0 s" in (rows[w1[1]].error.message or "")
    # The others' masked inputs go out without w1's shares among their inputs.
    masks = [ready for _, ready in harness.pending if ready.operation.name == "secagg.mask"]
    assert sorted(r.job_id for r in masks) == [
        j.id for j in graph if j.operation.name == "secagg.mask" and j.worker != "w1"
    ]
    assert all(len(r.inputs) == 3 + 2 for r in masks)  # 3 keys, 2 dealings
    # A result of w1's dropped job, arriving late, changes nothing.
    late = JobFinished(
        job=dealing.ref, product=product(dealing.ref), started_at=1.0, finished_at=9.0
    )
    harness.send((topics.events("w1"), late))
    assert harness.repository.jobs("s")[dealing.job_id].state is JobState.CANCELLED
    # A scheduler restored from its database keeps w1 out and goes on.
    row = harness.repository.artifact("s")
    assert row is not None
    record = restore(row, harness.repository.jobs("s"))
    assert record.locks is not None
    assert all(record.locks.held(r.job_id) == 0 for r in masks)
    for _ in range(4):  # masked inputs, reveals, the unmasking, the Finalize
        answer(harness)
    assert harness.state("s") is ArtifactState.COMPLETED
    unmask = next(j for j in graph if j.operation.name == "secagg.unmask")
    assert len(graph.consumes(unmask.id)) == 12
