"""The job attempts a worker knows of, owned by its agent thread alone (no locks).

Which JobReady is new, a duplicate (answered with what is known) or stale (ignored);
which running attempts to announce and to list in heartbeats; which results to send
again, and when the scheduler has acknowledged them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from flotta_mqtt.protocol import JobAccepted, JobReady, JobRef, JobStarted, WorkerEvent
from flotta_mqtt.worker.journal import Final, Held

JobKey = tuple[str, int]  # (artifact id, job id)
MAX_BACKOFF = 16  # a result unacknowledged for long is re-sent every 16 resend intervals
# A job still running this long after it started is announced (JobStarted); one that has
# finished by then is not: its result says when it started, and a message per job is saved.
STARTED_AFTER = 0.05


@dataclass(frozen=True)
class Work:
    """A job for a runner, and the signal that stops it."""

    job: JobReady
    cancelled: threading.Event


@dataclass
class Attempt:
    """One attempt of one job: its runner sees only `job` and `cancelled`."""

    job: JobReady
    cancelled: threading.Event = field(default_factory=threading.Event)
    started_at: float | None = None  # wall clock time its run started, once told
    done: bool = False  # its runner is through with it
    announced: bool = False  # JobStarted published for it
    final: Final | None = None
    first_sent: float = 0.0  # monotonic time the final event was first published
    sent_at: float = 0.0  # monotonic time the final event was last published
    resends: int = 0  # periodic re-sends of the final event so far (each waits twice longer)

    @property
    def running(self) -> bool:
        return self.started_at is not None and not self.done


class Attempts:
    """Every attempt not yet forgotten, by job."""

    def __init__(self) -> None:
        self._by_job: dict[JobKey, Attempt] = {}
        # Attempts that started, with when to announce them (monotonic), in start order.
        self._starting: deque[tuple[float, Attempt]] = deque()
        # When the scheduler last said anything, and the latest first publish of a result
        # it acknowledged (monotonic): what tells a lost result from a busy scheduler.
        self.heard = time.monotonic()
        self._answered = 0.0

    def get(self, ref: JobRef) -> Attempt | None:
        """The attempt `ref` names, if it is the one known."""
        attempt = self._by_job.get((ref.artifact_id, ref.job_id))
        return attempt if attempt is not None and attempt.job.attempt == ref.attempt else None

    def receive(self, job: JobReady) -> Attempt | WorkerEvent | None:
        """A new attempt to run; or the reply to a duplicate (a lost reply is recovered);
        or None for a stale re-send of an attempt already replaced."""
        key = (job.artifact_id, job.job_id)
        known = self._by_job.get(key)
        if known is not None and known.job.attempt > job.attempt:
            return None
        if known is not None and known.job.attempt == job.attempt:
            return known.final or JobAccepted(job=job.ref)
        if known is not None:
            known.cancelled.set()  # an older attempt nobody waits for any more
        # A new job gets no reply of its own: its result (or its announcement, if it runs
        # long) tells the scheduler it arrived.
        attempt = self._by_job[key] = Attempt(job)
        return attempt

    def resume(self, held: Held) -> Attempt:
        """An attempt the journal held across a restart."""
        attempt = Attempt(held.job, final=held.final, done=held.final is not None)
        self._by_job[(held.job.artifact_id, held.job.job_id)] = attempt
        return attempt

    def drop(self, attempt: Attempt) -> None:
        """Forget a cancelled attempt: a re-send of it is new."""
        key = (attempt.job.artifact_id, attempt.job.job_id)
        if self._by_job.get(key) is attempt:
            del self._by_job[key]

    def of(self, work: Work) -> Attempt | None:
        """The attempt a runner's work belongs to, unless it was forgotten since: a job
        taken again after being dropped or acknowledged has a new attempt, not this one."""
        job = work.job  # looked up by its fields: a JobRef built per call cost more
        attempt = self._by_job.get((job.artifact_id, job.job_id))
        return attempt if attempt is not None and attempt.cancelled is work.cancelled else None

    def started(self, work: Work, at: float, clock: float) -> None:
        """Its runner started it at `at` (wall clock), `clock` (monotonic)."""
        attempt = self.of(work)
        if attempt is not None and not attempt.done:
            attempt.started_at = at
            self._starting.append((clock + STARTED_AFTER, attempt))

    def finished(self, work: Work, final: Final | None, now: float) -> Final | JobRef | None:
        """Its runner is through: the result to publish; or, for an attempt the scheduler
        cancelled, its ref: it is forgotten here, and the agent forgets it in the journal
        (nothing will ever acknowledge it, and a restart must not run it again); or None
        when nobody wants a result any more (replaced, or the run broke)."""
        attempt = self.of(work)
        if attempt is None:
            return None
        attempt.done = True
        if attempt.cancelled.is_set():
            self.drop(attempt)
            return attempt.job.ref
        if final is None:
            return None
        attempt.final = final
        attempt.first_sent = attempt.sent_at = now
        return final

    def acknowledged(self, refs: list[JobRef]) -> None:
        """The scheduler has recorded these results: forget them."""
        for ref in refs:
            attempt = self.get(ref)
            if attempt is not None:
                del self._by_job[(ref.artifact_id, ref.job_id)]
                self._answered = max(self._answered, attempt.first_sent)

    def announce_at(self) -> float | None:
        """When the next started attempt is due to be announced (monotonic), if any."""
        return self._starting[0][0] if self._starting else None

    def announcements(self, now: float) -> list[JobStarted]:
        """JobStarted for the attempts still running STARTED_AFTER after they started."""
        due = []
        while self._starting and self._starting[0][0] <= now:
            attempt = self._starting.popleft()[1]
            if attempt.running and not attempt.announced and not attempt.cancelled.is_set():
                attempt.announced = True
                assert attempt.started_at is not None
                due.append(JobStarted(job=attempt.job.ref, at=attempt.started_at))
        return due

    def running(self) -> list[JobRef]:
        return [a.job.ref for a in self._by_job.values() if a.running]

    def resend(self, now: float, older_than: float) -> list[Final]:
        """The results to publish again: those not acknowledged within `older_than` s.

        A periodic re-send is for a result that looks lost: the scheduler acknowledged a
        result published after it (it handles them in order), or said nothing at all for
        `older_than`; a scheduler busy with a backlog is not flooded with copies. Each
        periodic re-send of a result waits twice as long as the one before (up to
        MAX_BACKOFF times `older_than`). A reconnect (`older_than` 0) re-sends them all.
        """
        silent = now - self.heard >= older_than
        again = []
        for attempt in self._by_job.values():
            if attempt.final is None:
                continue
            lost = silent or self._answered > attempt.first_sent
            if older_than > 0 and not lost:
                continue
            if now - attempt.sent_at >= older_than * min(MAX_BACKOFF, 2**attempt.resends):
                attempt.sent_at = now
                if older_than > 0:
                    attempt.resends += 1
                again.append(attempt.final)
        return again

    def cancel_all(self) -> None:
        for attempt in self._by_job.values():
            attempt.cancelled.set()
