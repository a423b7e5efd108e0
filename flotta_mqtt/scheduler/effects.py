"""What goes into the scheduler's core (events and the clock) and what comes out of it
(messages to publish, rows to write, stored statuses to announce)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel

from flotta_mqtt.model import Artifact, ArtifactState, JobGraph, JobState, SchedulerContext
from flotta_mqtt.protocol import NodePresence, RemoteError, Resource

if TYPE_CHECKING:
    from flotta_mqtt.scheduler.records import ArtifactRecord

Outgoing = tuple[str, BaseModel, bool]  # topic, message, retain

# --- in ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Clock:
    """The time a burst is handled at; the core reads no clock of its own.

    `caught_up` is the moment up to which everything received has been handled: the
    clock periodic re-sends count on, so a backlog in the scheduler's own inbox never
    passes for a silent worker.
    """

    monotonic: float
    wall: float
    caught_up: float


@dataclass(frozen=True, slots=True)
class Received:
    """A message from the bus, as it arrived (decoding it is the core's first step)."""

    topic: str
    payload: bytes
    arrived: float  # monotonic


@dataclass(frozen=True, slots=True)
class Connected:
    """The bus (re)connected: whatever may have been lost meanwhile is sent again."""


@dataclass(frozen=True, slots=True)
class Tick:
    """Time to check the timers: re-sends, waiting bindings, deadlines, retries, timeouts."""


Event = Received | Connected | Tick

# --- out: rows to write, applied by the repository in one transaction per burst ------------


@dataclass(frozen=True, slots=True)
class InsertArtifact:
    artifact: Artifact
    client: str
    now: float


@dataclass(frozen=True, slots=True)
class UpdateArtifact:
    artifact_id: str
    state: ArtifactState
    seq: int
    now: float
    error: RemoteError | None
    failed_job: int | None


@dataclass(frozen=True, slots=True)
class BindArtifact:
    """The context (binding is deterministic from it), every job and every lock."""

    artifact_id: str
    context: SchedulerContext
    graph: JobGraph


@dataclass(frozen=True, slots=True)
class UpdateJob:
    """A job's new state and attempt; the facts given (not None) are recorded too."""

    artifact_id: str
    job_id: int
    state: JobState
    attempt: int
    started_at: float | None = None
    finished_at: float | None = None
    product: Resource | None = None
    error: RemoteError | None = None
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class AssignJob:
    """A task moved to another worker."""

    artifact_id: str
    job_id: int
    worker: str


@dataclass(frozen=True, slots=True)
class CancelJobs:
    """Every unfinished job of the artifact is cancelled."""

    artifact_id: str


@dataclass(frozen=True, slots=True)
class SaveNode:
    presence: NodePresence


@dataclass(frozen=True, slots=True)
class DeleteArtifact:
    """A pruned artifact: its rows in every table go."""

    artifact_id: str


@dataclass(frozen=True, slots=True)
class SaveSchedule:
    """A schedule added, or fired (its next run and count of runs moved on)."""

    schedule_id: str
    owner: str
    cron: str
    artifact: Artifact  # what each run submits, under an id of its own
    next_run: float
    runs: int


@dataclass(frozen=True, slots=True)
class DeleteSchedule:
    schedule_id: str


Write = (
    InsertArtifact
    | UpdateArtifact
    | BindArtifact
    | UpdateJob
    | AssignJob
    | CancelJobs
    | SaveNode
    | DeleteArtifact
    | SaveSchedule
    | DeleteSchedule
)


@dataclass
class Decision:
    """What the core decided in one burst, for the service to carry out in this order:
    write `writes` and re-announce `stored` in one transaction, commit, delete what the
    database no longer names of the `pruned` artifacts (store objects, retained status),
    publish `publish` (JobReady first), then build and publish the statuses of `statuses`."""

    publish: list[Outgoing] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    # Artifacts not in memory (finished) whose stored status is to be announced again.
    stored: list[str] = field(default_factory=list)
    # Statuses recorded in this burst (their seq is in `writes`), with their wall clock.
    statuses: list[tuple[ArtifactRecord, float]] = field(default_factory=list)
    # Artifacts pruned in this burst (their rows deleted by `writes`).
    pruned: list[tuple[str, str]] = field(default_factory=list)  # (owner, artifact id)
