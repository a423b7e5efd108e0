"""Every message on the bus as a pydantic model; the JSON Schemas in schemas/ come from here.

Messages are small: payloads (data, products, logs) travel as Resources, URLs with a
sha256 the consumer verifies. Every message a node may receive twice carries the ids
that make handling it again a no-op (artifact, job, attempt).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from flotta_mqtt.model import Artifact, ArtifactState, JobRole, JobState, Operation, SafeId
from flotta_mqtt.model.durations import MAX_DURATION
from flotta_mqtt.model.ids import GroupName
from flotta_mqtt.model.operation import FiniteJsonObject

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# Job ids and attempts are SQLite INTEGERs (the scheduler's database, a worker's journal):
# a larger number must be refused on receipt, not fail inside a node's handler.
JobId = Annotated[int, Field(ge=0, lt=2**63)]
Attempt = Annotated[int, Field(ge=1, lt=2**63)]
Timestamp = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # seconds since the epoch


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


CacheScope = Annotated[str, Field(pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,127})$")]


class Resource(Message):
    """A product of a job in the resource store: where it is and what its bytes hash to."""

    url: Annotated[str, Field(min_length=1, max_length=2048)]
    sha256: Sha256
    size: Annotated[int, Field(ge=0)]
    media_type: str = "application/json"


class RemoteError(Message):
    """An exception raised on another node, as text: enough to re-raise or show it."""

    type: str
    message: str
    traceback: str = ""


class JobRef(Message):
    """One attempt of one job of one artifact."""

    artifact_id: SafeId
    job_id: JobId
    attempt: Attempt


# --- workbench → scheduler -------------------------------------------------------------

# An Artifact itself is the payload of "artifact submitted" (requests/{client}/submit).


class CancelArtifact(Message):
    artifact_id: SafeId
    reason: str = "cancelled by the workbench"


class StatusRequest(Message):
    """Ask for an artifact's status: the scheduler re-announces it, or rejects the request
    as naming no artifact it knows (the retained topic alone cannot say "no such id")."""

    artifact_id: SafeId


class PruneRequest(Message):
    """Remove every artifact finished more than `older_than` seconds ago: its database
    rows, its store objects and its retained status. Only administrators may ask."""

    older_than: Annotated[float, Field(ge=0, le=MAX_DURATION, allow_inf_nan=False)]


# --- scheduler → workbench / everyone ------------------------------------------------


# invalid: the request itself is wrong; unknown_artifact, unknown_schedule: no such
# artifact or schedule (or not the requester's to see); quota: over a limit the reason
# names; forbidden: not the requester's to ask (e.g. a prune by a non-administrator);
# unavailable: the scheduler could not record it now (its database refused the write):
# send it again later; other_group: its project is served by another scheduler group
# (the error names it).
RejectReason = Literal[
    "invalid",
    "unknown_artifact",
    "unknown_schedule",
    "quota",
    "forbidden",
    "unavailable",
    "other_group",
]


class RequestRejected(Message):
    """Why a request could not be handled: `invalid` (malformed, oversize, an internal
    error), `unknown_artifact` (it names an artifact the scheduler never saw),
    `forbidden` (its sender may not ask for it), `quota`, or `unavailable` (it could not
    be recorded now: send it again later)."""

    topic: str
    error: str
    artifact_id: SafeId | None = None
    reason: RejectReason = "invalid"


PRUNED_LISTED = 100  # the most artifact ids a PruneReport lists


class PruneReport(Message):
    """What a PruneRequest removed: how many artifacts, and the first ids of them."""

    older_than: Annotated[float, Field(ge=0, le=MAX_DURATION, allow_inf_nan=False)]
    pruned: Annotated[int, Field(ge=0)]
    artifact_ids: Annotated[list[SafeId], Field(max_length=PRUNED_LISTED)]


Reply = RequestRejected | PruneReport  # what a workbench's reply topic carries


class JobSummary(Message):
    """One job as a status shows it (for artifacts small enough to list every job)."""

    id: JobId
    step: str
    worker: str
    state: JobState
    attempt: Annotated[int, Field(ge=0)]
    name: str | None = None  # a workflow task's name
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    size: Annotated[int, Field(ge=0)] | None = None  # of its product
    exit_code: int | None = None
    error: str | None = None
    # Its product once completed: a caller of one job (a `@distributed` call) fetches its
    # own result from the status, without a request to the scheduler per job.
    product: Resource | None = None


class ArtifactStatus(Message):
    """The current state of an artifact, retained so a late subscriber sees it at once.

    `seq` grows with every change: a reader keeps the highest it has seen, so a stale
    duplicate never moves a view backwards.
    """

    artifact_id: SafeId
    project: str
    state: ArtifactState
    seq: Annotated[int, Field(ge=0)]
    total: Annotated[int, Field(ge=0)]
    counts: dict[JobState, int] = Field(default_factory=dict)
    error: RemoteError | None = None
    failed_job: JobId | None = None
    results: list[Resource] = Field(default_factory=list)  # products of the final jobs
    jobs: list[JobSummary] | None = None  # every job, when there are few enough to list
    # The DAG's locks (before, after), sent with `jobs` so a viewer can draw the graph.
    locks: list[tuple[JobId, JobId]] | None = None
    # The project's holders taking part, and those expected but left out (a quorum).
    holders: list[SafeId] = Field(default_factory=list)
    missing: list[SafeId] = Field(default_factory=list)
    updated_at: Timestamp


class LocksReleased(Message):
    """Locks released by completed jobs, for watchers; dispatch does not depend on it."""

    artifact_id: SafeId
    locks: list[tuple[JobId, JobId]]


# --- scheduler → one worker ------------------------------------------------------------


class JobReady(Message):
    """A job for one worker: everything it needs to run it, and nothing of anyone's data."""

    type: Literal["job_ready"] = "job_ready"
    artifact_id: SafeId
    job_id: JobId
    attempt: Attempt
    project: SafeId
    seed: int
    step: str
    kind: str
    role: JobRole
    iteration: Annotated[int, Field(ge=0)]
    operation: Operation
    inputs: list[Resource] = Field(default_factory=list)
    # For a workflow task with `cache`: whose earlier runs it may reuse and add to, the
    # owner's tenant (`*`: a scheduler without a registry, where everyone is one tenant).
    # Left out of every other job's message, which stays the size it was.
    cache_scope: CacheScope | None = Field(default=None, exclude_if=lambda scope: scope is None)

    @property
    def ref(self) -> JobRef:
        return JobRef(artifact_id=self.artifact_id, job_id=self.job_id, attempt=self.attempt)


class JobBatch(Message):
    """Several JobReady for one worker in one message: what a scheduler's burst made ready.

    A sender batches what it has at hand and never waits to fill a batch; a receiver
    handles each job as if it had arrived alone.
    """

    type: Literal["job_batch"] = "job_batch"
    jobs: list[JobReady] = Field(min_length=1)


WorkerJobs = Annotated[JobReady | JobBatch, Field(discriminator="type")]


class EventAck(Message):
    """The scheduler has durably recorded these finished/failed events: stop re-sending."""

    type: Literal["event_ack"] = "event_ack"
    jobs: list[JobRef]


class CancelJob(Message):
    """Stop this attempt if it runs; its result is no longer wanted."""

    type: Literal["cancel_job"] = "cancel_job"
    job: JobRef


WorkerControl = Annotated[EventAck | CancelJob, Field(discriminator="type")]


# --- one worker → scheduler ------------------------------------------------------------


class JobAccepted(Message):
    """The worker already holds the job: its answer to a JobReady it has seen before."""

    event: Literal["accepted"] = "accepted"
    job: JobRef


class JobStarted(Message):
    event: Literal["started"] = "started"
    job: JobRef
    at: Timestamp


class JobProgress(Message):
    event: Literal["progress"] = "progress"
    job: JobRef
    fraction: Annotated[float, Field(ge=0, le=1)] | None = None
    message: str = ""


class JobHeartbeat(Message):
    """The jobs a worker is running right now, sent every few seconds while it runs any.

    A running job missing from its worker's heartbeats for longer than the scheduler's
    grace period is treated as lost, even if the worker's connection looks alive.
    """

    event: Literal["heartbeat"] = "heartbeat"
    jobs: list[JobRef]
    at: Timestamp


class JobFinished(Message):
    event: Literal["finished"] = "finished"
    job: JobRef
    product: Resource
    started_at: Timestamp
    finished_at: Timestamp
    exit_code: int | None = None  # a workflow task's process status, when it has one
    # Why a workflow task did not run (its `when` was false, its for_each slot unused).
    skipped: Annotated[str, Field(max_length=1000)] | None = None


class JobFailed(Message):
    event: Literal["failed"] = "failed"
    job: JobRef
    error: RemoteError
    started_at: Timestamp | None = None
    finished_at: Timestamp
    exit_code: int | None = None  # a workflow task's process status, when it has one


WorkerEvent = Annotated[
    JobAccepted | JobStarted | JobProgress | JobHeartbeat | JobFinished | JobFailed,
    Field(discriminator="event"),
]


class EventBatch(Message):
    """Several events of one worker in one message, batched like JobBatch."""

    event: Literal["batch"] = "batch"
    events: list[WorkerEvent] = Field(min_length=1)


WorkerEvents = Annotated[
    JobAccepted | JobStarted | JobProgress | JobHeartbeat | JobFinished | JobFailed | EventBatch,
    Field(discriminator="event"),
]


# --- presence ----------------------------------------------------------------------------


class NodePresence(Message):
    """What a node offers, retained; its last will is the same with `online` false."""

    node: SafeId
    online: bool
    initiator: bool = False  # the scheduler's own job runner, holding no data
    projects: list[SafeId] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    operations: list[str] = Field(default_factory=list)
    executors: list[str] = Field(default_factory=list)  # workflow task executors it runs
    # What its site gives the tasks it runs besides a container: gpu, network (a claim the
    # scheduler routes by; a node lying about it only gets tasks it cannot run).
    features: list[Annotated[str, Field(max_length=32)]] = Field(
        default_factory=list, max_length=16
    )
    max_jobs: Annotated[int, Field(ge=1)] = 1
    details: FiniteJsonObject = Field(default_factory=dict)  # e.g. dataset schemas
    since: Timestamp


# --- the directory: which scheduler group serves a project --------------------------------


class DirectoryEntry(Message):
    """The scheduler group serving a project, retained on directory/{project} by that
    group's scheduler, so that a workbench finds where to submit from the project alone."""

    project: SafeId
    group: GroupName
    scheduler: SafeId


# --- sessions: one identity, one process (transport/claims.py) --------------------------

Token = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class SessionClaim(Message):
    """A process's hold on its broker identity, retained on sessions/{client} while it is
    connected, so that another process of the same identity refuses to start.

    It is void once cleared (a stop, or the will of a node with no will of its own), once
    expired (it is refreshed every keepalive and expires after two), or once the process's
    own will, whose sha256 is `will`, has been published: the broker judged it gone."""

    type: Literal["claim"] = "claim"
    client: SafeId
    session: Token  # this process's, drawn at random
    host: Annotated[str, Field(pattern=r"^[^\x00-\x1f\x7f-\x9f]{0,255}$")]  # shown in errors
    pid: Annotated[int, Field(ge=0)]
    since: Timestamp
    keepalive: Annotated[int, Field(ge=1)]
    will: Sha256 | None = None


class SessionProbe(Message):
    """A probe's marker to itself on sessions/{client}: once it is back, the retained claim
    (sent on subscribing) has arrived before it."""

    type: Literal["probe"] = "probe"
    nonce: Token


SessionMessage = Annotated[SessionClaim | SessionProbe, Field(discriminator="type")]


__all__ = [
    "Artifact",
    "ArtifactStatus",
    "CancelArtifact",
    "CancelJob",
    "DirectoryEntry",
    "EventAck",
    "EventBatch",
    "JobAccepted",
    "JobBatch",
    "JobFailed",
    "JobFinished",
    "JobHeartbeat",
    "JobProgress",
    "JobReady",
    "JobRef",
    "JobStarted",
    "JobSummary",
    "LocksReleased",
    "Message",
    "NodePresence",
    "PruneReport",
    "PruneRequest",
    "RemoteError",
    "Reply",
    "RequestRejected",
    "Resource",
    "SessionClaim",
    "SessionMessage",
    "SessionProbe",
    "StatusRequest",
    "WorkerControl",
    "WorkerEvent",
]
