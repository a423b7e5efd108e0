"""Deadline policy: an artifact's deadline, a job's timeout, a worker's heartbeat grace,
and the grace a scheduler just started gives workers to announce themselves."""

from __future__ import annotations

from dataclasses import dataclass

from flotta_mqtt.model import Artifact, Job


@dataclass(frozen=True)
class DeadlinePolicy:
    heartbeat_grace: float
    worker_grace: float
    default_deadline: float | None = None  # for artifacts that give none

    def overdue(self, artifact: Artifact, submitted_at: float, wall: float) -> str | None:
        """Why an artifact is over its deadline (wall clock), or None while it is not."""
        deadline = artifact.deadline or self.default_deadline
        if deadline is not None and wall > submitted_at + deadline:
            return f"artifact not done within its deadline of {deadline} s"
        return None

    def over_timeout(self, job: Job, started: float | None, now: float) -> str | None:
        """Why a running attempt is over its job's timeout, or None."""
        if job.timeout is not None and started is not None and now - started > job.timeout:
            return f"job {job.id} ran over its timeout of {job.timeout} s"
        return None

    def silent(self, started: float | None, last_seen: float | None, now: float) -> bool:
        """Whether a running attempt's worker sent no heartbeat for longer than the grace."""
        if started is None:
            return False
        return now - (started if last_seen is None else last_seen) > self.heartbeat_grace

    def awaiting_workers(self, started_at: float, now: float) -> bool:
        """Whether a scheduler started at `started_at` may still hear workers' presence."""
        return now - started_at < self.worker_grace
