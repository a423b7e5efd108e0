"""Attempts in flight: stopped over their timeout, moved off a lost node."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from flotta_mqtt.model import Registry
from flotta_mqtt.protocol import JobRef, NodePresence, RemoteError
from flotta_mqtt.scheduler.binding import relocate_task
from flotta_mqtt.scheduler.effects import AssignJob
from flotta_mqtt.scheduler.jobs import JobFlow
from flotta_mqtt.scheduler.membership import serving
from flotta_mqtt.scheduler.records import ArtifactRecord

if TYPE_CHECKING:
    from flotta_mqtt.scheduler.core import Policies

log = logging.getLogger(__name__)


def check_running(
    record: ArtifactRecord,
    now: float,
    flow: JobFlow,
    policies: Policies,
    nodes: Mapping[str, NodePresence],
    registry: Registry | None,
) -> None:
    """Stop attempts over their timeout; move jobs that hold no data off a lost node.

    The policy per step type: a worker's data job waits for its worker (until the
    artifact's deadline), since only that worker holds the data; an initiator job is
    run again; a workflow task moves to another worker able to run it.
    """
    assert record.graph is not None
    deadlines, retries, attempts = (
        policies.deadlines,
        policies.retries,
        record.attempts,
    )
    # A job nobody announced as started can only be lost with an offline node.
    offline = any(not node.online for node in nodes.values())
    for job_id in list(attempts.dispatched_at if offline else attempts.started_at):
        job = record.graph.jobs[job_id]
        worker = record.worker(job_id)
        status = record.jobs[job_id]
        started = attempts.started_at.get(job_id)
        over = deadlines.over_timeout(job, started, now)
        if over is not None:
            flow.stop_attempt(record, job_id)
            ref = JobRef(artifact_id=record.id, job_id=job_id, attempt=status.attempt)
            error = RemoteError(type="TimeoutError", message=over)
            flow.failed(record, ref, error, flow.clock.wall)
            continue
        if not job.relocatable:
            continue
        node = nodes.get(worker)
        silent = deadlines.silent(started, attempts.last_seen.get(job_id), now)
        if not ((node is not None and not node.online) or silent):
            continue
        lost = attempts.lost[job_id] = attempts.lost.get(job_id, 0) + 1
        if retries.lost_too_often(lost):
            message = f"job {job_id} lost its node {worker} {lost} times"
            flow.fail(record, "WorkerLost", message, job_id)
            return
        flow.stop_attempt(record, job_id)
        if job.kind == "tasks":
            able = serving(record.client, registry, nodes)  # never outside its tenant's
            moved_to = relocate_task(record.graph, job_id, able, away_from=worker)
            if moved_to is not None:
                record.assigned[job_id] = moved_to
                flow.decision.writes.append(AssignJob(record.id, job_id, moved_to))
        log.warning(
            "job %s/%s lost with %s: retrying on %s",
            record.id,
            job_id,
            worker,
            record.worker(job_id),
        )
        flow.retry(record, job_id, status.requeue(status.attempt))
