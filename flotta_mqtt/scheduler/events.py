"""What workers say about their jobs: accepted, started, finished, failed, progress and
heartbeats, each believed only from the worker the job was given to."""

from __future__ import annotations

import logging
from typing import Any

from flotta_mqtt.model import IllegalTransition, JobState, StaleAttempt
from flotta_mqtt.protocol import (
    JobAccepted,
    JobFailed,
    JobFinished,
    JobHeartbeat,
    JobProgress,
    JobRef,
    JobStarted,
)
from flotta_mqtt.scheduler.announcements import Announcements
from flotta_mqtt.scheduler.jobs import JobFlow
from flotta_mqtt.scheduler.records import ArtifactRecord
from flotta_mqtt.scheduler.resends import ResendPolicy

log = logging.getLogger(__name__)


class WorkerEvents:
    """Turns workers' events into job transitions of the unfinished artifacts."""

    def __init__(
        self,
        artifacts: dict[str, ArtifactRecord],
        flow: JobFlow,
        announcements: Announcements,
        resends: ResendPolicy,
    ) -> None:
        self.artifacts = artifacts
        self.flow = flow
        self.announcements = announcements
        self.resends = resends

    def handle(self, worker: str, event: Any) -> None:
        """One event (or heartbeat) from `worker`, believed only for the jobs given to it."""
        resends = self.resends
        if isinstance(event, JobHeartbeat):
            self._heartbeat(worker, event)
            return
        resends.heard(worker, self.flow.arrived)
        ref: JobRef = event.job
        final = isinstance(event, JobFinished | JobFailed)
        record = self.artifacts.get(ref.artifact_id)
        if record is not None and ref.job_id < len(record.jobs):
            sent = record.attempts.dispatched_at.get(ref.job_id)
            if sent is not None and record.jobs[ref.job_id].attempt == ref.attempt:
                resends.answered(worker, sent)
        if record is None or record.graph is None:
            if final and record is None:
                # The artifact is over, or pruned (or never was): stop the worker re-sending.
                self.announcements.acknowledge(worker, ref)
            return
        if ref.job_id >= len(record.jobs):
            log.error(
                "scheduler: %s reported job %s of %s, which has no such job",
                worker,
                ref.job_id,
                ref.artifact_id,
            )
            return
        owner = record.worker(ref.job_id)
        if worker != owner:
            log.error(
                "scheduler: %s reported on job %s/%s, which was given to %s: ignored",
                worker,
                ref.artifact_id,
                ref.job_id,
                owner,
            )
            return
        if final:
            self.announcements.acknowledge(worker, ref)
        try:
            self._job_event(record, event)
        except (StaleAttempt, IllegalTransition) as exc:
            # A duplicate or a late event of an abandoned attempt: it changes nothing.
            log.debug("scheduler: ignored %s from %s: %s", event.event, worker, exc)

    def _job_event(self, record: ArtifactRecord, event: Any) -> None:
        ref: JobRef = event.job
        status = record.jobs[ref.job_id]
        if isinstance(event, JobAccepted):
            if status.attempt == ref.attempt:
                record.attempts.accepted.add(ref.job_id)
        elif isinstance(event, JobStarted):
            self.flow.started(record, ref, event.at)
        elif isinstance(event, JobFinished):
            self.flow.finished(record, event)
        elif isinstance(event, JobFailed):
            if status.attempt != ref.attempt or status.final:
                return  # a late or repeated failure report: already handled
            if status.state is JobState.DISPATCHED and event.started_at is not None:
                ran_for = event.finished_at - event.started_at
                self.flow.started_unannounced(record, ref.job_id, ran_for)
            self.flow.failed(record, ref, event.error, event.finished_at, event.exit_code)
        elif isinstance(event, JobProgress):
            log.info("job %s/%s: %s", ref.artifact_id, ref.job_id, event.message)

    def _heartbeat(self, worker: str, beat: JobHeartbeat) -> None:
        self.resends.heard(worker, self.flow.arrived)
        now = self.flow.clock.monotonic
        for ref in beat.jobs:
            record = self.artifacts.get(ref.artifact_id)
            if record is None or record.graph is None or ref.job_id >= len(record.jobs):
                continue
            if record.worker(ref.job_id) != worker:
                continue
            if record.jobs[ref.job_id].attempt == ref.attempt:
                record.attempts.last_seen[ref.job_id] = now
