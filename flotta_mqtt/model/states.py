"""Job and artifact state machines, with attempts, as pure code the scheduler builds on."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from flotta_mqtt.model.errors import IllegalTransition, StaleAttempt


class JobState(StrEnum):
    WAITING = "waiting"  # some lock on it is not released yet
    READY = "ready"  # every lock released; not yet sent to its worker
    DISPATCHED = "dispatched"  # sent to its worker for the current attempt
    RUNNING = "running"  # its worker said it started the current attempt
    COMPLETED = "completed"  # its product is recorded; its locks are released
    FAILED = "failed"  # it failed for good: the artifact fails with it
    CANCELLED = "cancelled"  # the artifact was cancelled or failed before it finished
    # A workflow task that did not run (its `when` false, its for_each slot unused, an
    # on_failure handler when nothing failed): done, as far as its dependents go.
    SKIPPED = "skipped"


class ArtifactState(StrEnum):
    SUBMITTED = "submitted"  # received, not yet bound (e.g. waiting for workers)
    RUNNING = "running"  # bound; jobs are being dispatched
    COMPLETED = "completed"  # every job completed
    FAILED = "failed"  # refused at submission, or a job failed
    CANCELLED = "cancelled"  # cancelled by the workbench


JOB_FINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED})
# The final states that release a job's locks: its dependents go on.
JOB_DONE = frozenset({JobState.COMPLETED, JobState.SKIPPED})
ARTIFACT_FINAL = frozenset({ArtifactState.COMPLETED, ArtifactState.FAILED, ArtifactState.CANCELLED})

_JOB_NEXT: dict[JobState, frozenset[JobState]] = {
    JobState.WAITING: frozenset({JobState.READY, JobState.CANCELLED, JobState.SKIPPED}),
    JobState.READY: frozenset({JobState.DISPATCHED, JobState.CANCELLED}),
    # A finished event may overtake the started one across a reconnect, and a job whose
    # worker is lost goes back to READY for another attempt.
    JobState.DISPATCHED: frozenset(
        {
            JobState.RUNNING,
            JobState.COMPLETED,
            JobState.FAILED,
            JobState.READY,
            JobState.CANCELLED,
            JobState.SKIPPED,
        }
    ),
    JobState.RUNNING: frozenset(
        {JobState.COMPLETED, JobState.FAILED, JobState.READY, JobState.CANCELLED, JobState.SKIPPED}
    ),
    JobState.COMPLETED: frozenset(),
    JobState.SKIPPED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

_ARTIFACT_NEXT: dict[ArtifactState, frozenset[ArtifactState]] = {
    ArtifactState.SUBMITTED: frozenset(
        {ArtifactState.RUNNING, ArtifactState.FAILED, ArtifactState.CANCELLED}
    ),
    ArtifactState.RUNNING: frozenset(
        {ArtifactState.COMPLETED, ArtifactState.FAILED, ArtifactState.CANCELLED}
    ),
    ArtifactState.COMPLETED: frozenset(),
    ArtifactState.FAILED: frozenset(),
    ArtifactState.CANCELLED: frozenset(),
}


def check_job_transition(current: JobState, new: JobState) -> None:
    if new not in _JOB_NEXT[current]:
        raise IllegalTransition(f"a job cannot go from {current} to {new}")


def check_artifact_transition(current: ArtifactState, new: ArtifactState) -> None:
    if new not in _ARTIFACT_NEXT[current]:
        raise IllegalTransition(f"an artifact cannot go from {current} to {new}")


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A job's state and current attempt; every change returns a new value.

    Events carry the attempt they are about: one for an older attempt raises StaleAttempt,
    so a late result of an abandoned attempt changes nothing.
    """

    state: JobState = JobState.WAITING
    attempt: int = 0  # 0 until first dispatched; each dispatch starts a new attempt

    def _to(self, new: JobState) -> JobStatus:
        check_job_transition(self.state, new)
        return JobStatus(new, self.attempt)  # not dataclasses.replace: several per link

    def _current(self, attempt: int) -> None:
        if attempt != self.attempt:
            raise StaleAttempt(f"attempt {attempt} is not the current attempt {self.attempt}")

    def ready(self) -> JobStatus:
        """Every lock is released. Only a waiting job becomes ready this way."""
        if self.state is not JobState.WAITING:
            raise IllegalTransition(f"only a waiting job becomes ready, not a {self.state} one")
        return self._to(JobState.READY)

    def dispatch(self) -> JobStatus:
        check_job_transition(self.state, JobState.DISPATCHED)
        return JobStatus(JobState.DISPATCHED, self.attempt + 1)

    def start(self, attempt: int) -> JobStatus:
        self._current(attempt)
        return self._to(JobState.RUNNING)

    def complete(self, attempt: int) -> JobStatus:
        self._current(attempt)
        return self._to(JobState.COMPLETED)

    def skip(self, attempt: int | None = None) -> JobStatus:
        """It did not run: its worker said so for this attempt, or (no attempt) the
        scheduler decided it before dispatch."""
        if attempt is not None:
            self._current(attempt)
        return self._to(JobState.SKIPPED)

    def fail(self, attempt: int) -> JobStatus:
        self._current(attempt)
        return self._to(JobState.FAILED)

    def requeue(self, attempt: int) -> JobStatus:
        """The worker of this attempt is lost: make the job ready for another attempt."""
        self._current(attempt)
        if self.state not in (JobState.DISPATCHED, JobState.RUNNING):
            raise IllegalTransition(
                f"only a dispatched or running job is requeued, not {self.state}"
            )
        return self._to(JobState.READY)

    def cancel(self) -> JobStatus:
        return self._to(JobState.CANCELLED)

    @property
    def final(self) -> bool:
        return self.state in JOB_FINAL
