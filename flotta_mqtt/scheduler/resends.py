"""Re-send policy: which dispatched jobs are sent to their worker again, and when.

Broker persistence is not end to end: a broker crash can lose a job it accepted. So a
job is sent again when its worker (re)connects, when the scheduler reconnects, and
periodically when it looks lost. Looking lost counts on the caught-up clock (what this
scheduler has handled so far), never the wall clock: a worker busy with a long queue, or
a backlog in the scheduler's own inbox, is no sign of loss, and re-sending then only
makes the backlogs longer.
"""

from __future__ import annotations

from collections.abc import Iterable

from flotta_mqtt.model import JobState
from flotta_mqtt.scheduler.records import ArtifactRecord

_OUT = (JobState.DISPATCHED, JobState.RUNNING)


class ResendPolicy:
    """Tracks what each worker was last heard saying, and picks the jobs to send again."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._heard: dict[str, float] = {}  # worker → when its last event arrived
        self._answered: dict[str, float] = {}  # worker → latest dispatch it answered

    def heard(self, worker: str, arrived: float) -> None:
        self._heard[worker] = arrived

    def answered(self, worker: str, dispatched_at: float) -> None:
        """The worker answered the attempt dispatched at `dispatched_at`."""
        self._answered[worker] = max(self._answered.get(worker, 0.0), dispatched_at)

    def to_resend(
        self,
        records: Iterable[ArtifactRecord],
        caught_up: float,
        *,
        worker: str | None = None,
        periodic: bool = False,
        include_accepted: bool = False,
    ) -> list[tuple[ArtifactRecord, int]]:
        """The dispatched jobs (of `worker`, or of all) to send again.

        Periodic re-sends take only jobs that look lost: unanswered for the interval
        while their worker answered a job dispatched after them (a worker handles its
        jobs in order), or said nothing at all for that long. Other re-sends take every
        job not yet accepted, or every job with `include_accepted` (a worker that came
        back online may have forgotten what it held).
        """
        older_than = self.interval if periodic else 0.0
        due: list[tuple[ArtifactRecord, int]] = []
        for record in records:
            if record.graph is None:
                continue
            attempts = record.attempts
            for job_id, sent in attempts.dispatched_at.items():
                if periodic and caught_up - sent < older_than:
                    break  # in dispatch order: every job after this one is younger still
                last = attempts.resent_at.get(job_id, sent)
                if periodic and caught_up - last < older_than:
                    continue
                if job_id in attempts.accepted and not include_accepted:
                    continue
                owner = record.worker(job_id)
                if periodic and not self._maybe_lost(owner, sent, last, caught_up):
                    continue
                if worker is not None and owner != worker:
                    continue
                if record.jobs[job_id].state not in _OUT:
                    continue
                due.append((record, job_id))
        return due

    def _maybe_lost(self, worker: str, sent: float, last: float, caught_up: float) -> bool:
        """Whether a job dispatched at `sent`, last sent at `last` and not answered since
        may have been lost. A re-send is not a dispatch: answering one says nothing of
        the jobs queued before it (counting it so re-sent whole queues)."""
        if caught_up - last < self.interval:
            return False
        if self._answered.get(worker, 0.0) > sent:
            return True
        return caught_up - max(self._heard.get(worker, 0.0), last) >= self.interval
