"""What the scheduler holds in memory about each unfinished artifact, and how such a
record is rebuilt from the rows the repository stored."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    JobGraph,
    JobState,
    JobStatus,
    LockTable,
    SchedulerContext,
    bind,
)
from flotta_mqtt.protocol import JobSummary, RemoteError, Resource
from flotta_mqtt.scheduler.config import LISTED_JOBS
from flotta_mqtt.scheduler.gc_pause import gc_paused


@dataclass
class ArtifactRow:
    """An artifact as the repository stores it."""

    artifact: Artifact
    client: str
    context: SchedulerContext | None
    state: ArtifactState
    seq: int
    error: RemoteError | None
    failed_job: int | None
    submitted_at: float


@dataclass
class JobRow:
    """A job as the repository stores it."""

    job_id: int
    worker: str
    state: JobState
    attempt: int
    started_at: float | None
    finished_at: float | None
    product: Resource | None
    error: RemoteError | None
    exit_code: int | None = None


@dataclass
class JobFacts:
    """What a status lists about one job beyond its state."""

    started_at: float | None = None
    finished_at: float | None = None
    size: int | None = None
    exit_code: int | None = None
    error: str | None = None


@dataclass
class Attempts:
    """The clocks of the jobs' current attempts (monotonic seconds).

    `dispatched_at` is the burst's clock when the attempt went out (jobs dispatched
    together count as simultaneous) and is kept in dispatch order: the re-send policy
    stops at the first job too young.
    """

    accepted: set[int] = field(default_factory=set)  # dispatched jobs their worker holds
    dispatched_at: dict[int, float] = field(default_factory=dict)
    resent_at: dict[int, float] = field(default_factory=dict)
    started_at: dict[int, float] = field(default_factory=dict)  # running jobs
    last_seen: dict[int, float] = field(default_factory=dict)  # last heartbeat
    retry_at: dict[int, float] = field(default_factory=dict)  # ready jobs waiting to retry
    lost: dict[int, int] = field(default_factory=dict)  # times each job lost its node

    def forget(self, job_id: int) -> None:
        """Drop the clocks of a job's attempt once it is over."""
        for clocks in (self.dispatched_at, self.resent_at, self.started_at, self.last_seen):
            clocks.pop(job_id, None)
        self.accepted.discard(job_id)


@dataclass
class Listing:
    """What a small artifact's status lists, kept to rebuild only what changed."""

    facts: dict[int, JobFacts] = field(default_factory=dict)
    # Per job: the last summary built, with the key and product it was built from.
    summaries: dict[int, tuple[Any, Resource | None, JobSummary]] = field(default_factory=dict)
    locks: list[tuple[int, int]] | None = None  # the DAG's locks, sorted once


@dataclass
class ArtifactRecord:
    """An unfinished artifact: its graph, its jobs' states, and what was announced."""

    artifact: Artifact
    client: str
    state: ArtifactState
    seq: int
    submitted_at: float = 0.0  # wall clock, for the artifact's deadline
    context: SchedulerContext | None = None  # who it was bound to, once bound
    graph: JobGraph | None = None
    locks: LockTable | None = None
    jobs: list[JobStatus] = field(default_factory=list)
    counts: Counter[JobState] = field(default_factory=Counter)  # kept as jobs change
    products: dict[int, Resource] = field(default_factory=dict)
    assigned: dict[int, str] = field(default_factory=dict)  # tasks moved off a lost worker
    error: RemoteError | None = None
    failed_job: int | None = None
    attempts: Attempts = field(default_factory=Attempts)
    listing: Listing = field(default_factory=Listing)
    announced: ArtifactState | None = None  # the state its last published status had
    announced_at: float = 0.0  # when that status was recorded (monotonic)

    @property
    def id(self) -> str:
        return self.artifact.id

    @property
    def listed(self) -> bool:
        """Whether its status lists every job (small artifacts only)."""
        return len(self.jobs) <= LISTED_JOBS

    def worker(self, job_id: int) -> str:
        """The node a job runs on now: where binding put it, unless it was moved since."""
        assert self.graph is not None
        return self.assigned.get(job_id) or self.graph.jobs[job_id].worker

    def note(self, job_id: int, **facts: Any) -> None:
        """Remember facts about a job for the status listing, if this artifact is listed."""
        if self.listed:
            known = self.listing.facts.setdefault(job_id, JobFacts())
            for name, value in facts.items():
                setattr(known, name, value)

    def bound(self, graph: JobGraph, completed: list[int]) -> None:
        """Hold its bound graph, with the locks the completed jobs released."""
        self.graph = graph
        self.locks = LockTable(graph, completed)
        if not self.jobs:
            self.set_jobs([JobStatus() for _ in graph.jobs])

    def set_jobs(self, jobs: list[JobStatus]) -> None:
        self.jobs = jobs
        self.counts = Counter(status.state for status in jobs)

    def set_job(self, job_id: int, status: JobStatus) -> None:
        """Change one job's status, keeping the per-state counts current in O(1)."""
        self.counts[self.jobs[job_id].state] -= 1
        self.counts[status.state] += 1
        self.jobs[job_id] = status


def restore(row: ArtifactRow, jobs: list[JobRow]) -> ArtifactRecord:
    """An artifact's record as stored; binding again (deterministic) gives its graph."""
    record = ArtifactRecord(
        row.artifact,
        row.client,
        row.state,
        row.seq,
        submitted_at=row.submitted_at,
        error=row.error,
        failed_job=row.failed_job,
        context=row.context,
    )
    if row.context is None:
        return record
    record.set_jobs([JobStatus(j.state, j.attempt) for j in jobs])
    # A workflow goes on past a failed task; its error may not have reached the artifact's
    # row yet (statuses are folded), but the failed job's row has it.
    failed = next((j for j in jobs if j.state is JobState.FAILED), None)
    if record.error is None and failed is not None:
        record.error, record.failed_job = failed.error, failed.job_id
    record.products = {j.job_id: j.product for j in jobs if j.product is not None}
    # A cancelled job of a running artifact dropped out of a secure aggregation (or is a
    # failed task's descendant, whose successors are cancelled too): its locks are released.
    released = (JobState.COMPLETED, JobState.CANCELLED, JobState.SKIPPED)
    completed = [j.job_id for j in jobs if j.state in released]
    with gc_paused():
        graph = bind(row.artifact, row.context)
        record.bound(graph, completed)
    for j in jobs:
        if j.worker != graph.jobs[j.job_id].worker:
            record.assigned[j.job_id] = j.worker
        record.note(
            j.job_id,
            started_at=j.started_at,
            finished_at=j.finished_at,
            size=j.product.size if j.product else None,
            exit_code=j.exit_code,
            error=f"{j.error.type}: {j.error.message}"[:300] if j.error else None,
        )
    return record
