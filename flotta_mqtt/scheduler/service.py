"""The scheduler node: binds artifacts into jobs, dispatches them, and owns their state.

One thread does all the work, the bus's network work included (an unthreaded Bus): it
reads what has arrived, takes it (up to BURST messages, never waiting for more), handles
it inside one SQLite transaction, commits, and only then publishes what the burst
decided, writing it to the socket itself: durable before acting, with one commit per
burst rather than per message, and no hand-over between threads on a job's way. The
jobs it made ready go out first; the artifacts' statuses (recorded in the same
transaction) are built and published after them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field

from flotta_mqtt import analytics as operations
from flotta_mqtt.logs import log_context
from flotta_mqtt.model import (
    ARTIFACT_FINAL,
    JOB_FINAL,
    Artifact,
    ArtifactState,
    BindingError,
    IllegalTransition,
    Iterate,
    JobGraph,
    JobState,
    JobStatus,
    LockTable,
    NodeRef,
    Parallel,
    SafeId,
    SchedulerContext,
    Sequential,
    StaleAttempt,
    Step,
    Task,
    bind,
    candidates,
)
from flotta_mqtt.protocol import (
    ArtifactStatus,
    CancelArtifact,
    CancelJob,
    EventAck,
    JobAccepted,
    JobFailed,
    JobFinished,
    JobHeartbeat,
    JobProgress,
    JobReady,
    JobRef,
    JobStarted,
    JobSummary,
    LocksReleased,
    NodePresence,
    ProtocolError,
    RemoteError,
    RequestRejected,
    Resource,
    decode,
    topics,
    unbatch,
)
from flotta_mqtt.protocol.topics import Address, Channel
from flotta_mqtt.scheduler.database import Database
from flotta_mqtt.scheduler.metrics import MetricsServer, SchedulerMetrics, scheduler_sampler
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import RESULTS_MANIFEST, ResourceStore
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig
from flotta_mqtt.workflows.executors import check_task

log = logging.getLogger(__name__)

BURST = 500  # the most messages handled in one transaction
TICK = 0.25  # seconds between checks of timers: retries, timeouts, deadlines, re-sends
# A running artifact's progress goes out at most once per STATUS_INTERVAL seconds (what
# changed meanwhile is folded into the next status); a change of its state goes out at once.
STATUS_INTERVAL = 0.05
# Results are acknowledged within ACK_DELAY seconds, many per message, or at once when
# ACK_BATCH wait for one worker: an acknowledgement only stops re-sends, never urgent.
ACK_DELAY = 0.05
ACK_BATCH = 500


class SchedulerConfig(BaseModel):
    """A scheduler node's settings, from a YAML file, flags or FLOTTA_* variables."""

    model_config = ConfigDict(extra="forbid")

    name: SafeId = "scheduler"
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: Path = Path("flotta-scheduler.db")
    # Whether workbenches may fetch final products. On by default, as in the embedded demo;
    # turn it off on a node whose results must stay where they are.
    allow_download: bool = True
    resend_interval: float = Field(default=5.0, gt=0)
    # A running job whose worker sent no heartbeat for this long is treated as lost.
    heartbeat_grace: float = Field(default=30.0, gt=0)
    # Retries wait base * 2**(attempt - 1) seconds, at most `max`, with jitter.
    retry_backoff: float = Field(default=1.0, ge=0)
    retry_backoff_max: float = Field(default=60.0, ge=0)
    # Attempts an initiator job gets when its node is lost (it holds no data, so it moves).
    max_lost_attempts: int = Field(default=3, ge=1)
    # A scheduler just started waits this long for workers' retained presence before
    # failing an artifact whose project nobody seems to hold.
    worker_grace: float = Field(default=5.0, ge=0)
    run_initiator: bool = True  # run the initiator's jobs in this node
    # The initiator's own broker identity (it reads its job topic like any worker); by
    # default the scheduler's settings under the initiator's name.
    initiator_broker: BrokerSettings | None = None
    initiator_plugins: list[str] = Field(default_factory=list)
    # Serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: any free port); None: off.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    @property
    def initiator(self) -> str:
        return f"{self.name}.initiator"


READ_ONLY = (JobAccepted, JobHeartbeat)  # messages whose handling never writes the database
LISTED_JOBS = 300  # artifacts with at most this many jobs list each one in their status


@dataclass
class _Facts:
    """What a status lists about one job beyond its state."""

    started_at: float | None = None
    finished_at: float | None = None
    size: int | None = None
    exit_code: int | None = None
    error: str | None = None


@dataclass
class _Artifact:
    """An unfinished artifact as the scheduler thread holds it in memory."""

    artifact: Artifact
    client: str
    state: ArtifactState
    seq: int
    graph: JobGraph | None = None
    locks: LockTable | None = None
    jobs: list[JobStatus] = field(default_factory=list)
    products: dict[int, Resource] = field(default_factory=dict)
    accepted: set[int] = field(default_factory=set)  # dispatched jobs their worker holds
    # When the current attempt was dispatched (the burst's clock: jobs dispatched together
    # count as simultaneous, whatever order their worker's runners end them in), and when
    # it was last re-sent. Monotonic; `dispatched_at` is kept in dispatch order.
    dispatched_at: dict[int, float] = field(default_factory=dict)
    resent_at: dict[int, float] = field(default_factory=dict)
    started_at: dict[int, float] = field(default_factory=dict)  # running jobs (monotonic)
    last_seen: dict[int, float] = field(default_factory=dict)  # last heartbeat (monotonic)
    retry_at: dict[int, float] = field(default_factory=dict)  # ready jobs waiting to retry
    lost_attempts: dict[int, int] = field(default_factory=dict)
    submitted_at: float = 0.0  # wall clock, for the artifact's deadline
    error: RemoteError | None = None
    failed_job: int | None = None
    counts: Counter[JobState] = field(default_factory=Counter)  # kept as jobs change
    assigned: dict[int, str] = field(default_factory=dict)  # tasks moved off a lost worker
    facts: dict[int, _Facts] = field(default_factory=dict)  # for listing small artifacts
    # The last summary built for each listed job, with what it was built from.
    listed: dict[int, tuple[Any, Resource | None, JobSummary]] = field(default_factory=dict)
    sorted_locks: list[tuple[int, int]] | None = None
    announced: ArtifactState | None = None  # the state its last published status had
    announced_at: float = 0.0  # when that status was recorded (monotonic)

    def worker(self, job_id: int) -> str:
        """The node a job runs on now: where binding put it, unless it was moved since."""
        assert self.graph is not None
        return self.assigned.get(job_id) or self.graph.jobs[job_id].worker

    def note(self, job_id: int, **facts: Any) -> None:
        """Remember facts about a job for the status listing, if this artifact is listed."""
        if len(self.jobs) <= LISTED_JOBS:
            known = self.facts.setdefault(job_id, _Facts())
            for name, value in facts.items():
                setattr(known, name, value)

    def summaries(self) -> list[JobSummary] | None:
        """The job listing of a small artifact's status; None for a large one.

        A status goes out after every burst that changed the artifact, and most jobs did
        not change since the last one: their summaries (immutable) are reused, and only
        those whose state, worker, facts or product changed are built again.
        """
        if self.graph is None or len(self.jobs) > LISTED_JOBS:
            return None
        listed = []
        for job, status in zip(self.graph.jobs, self.jobs, strict=True):
            facts = self.facts.get(job.id, _Facts())
            worker = self.worker(job.id)
            product = self.products.get(job.id)
            key = (
                status,
                worker,
                facts.started_at,
                facts.finished_at,
                facts.size,
                facts.exit_code,
                facts.error,
            )
            cached = self.listed.get(job.id)
            if cached is not None and cached[0] == key and cached[1] is product:
                listed.append(cached[2])
                continue
            summary = JobSummary(
                id=job.id,
                step=job.step,
                worker=worker,
                state=status.state,
                attempt=status.attempt,
                name=str(job.operation.params["name"]) if job.kind == "tasks" else None,
                started_at=facts.started_at,
                finished_at=facts.finished_at,
                size=facts.size,
                exit_code=facts.exit_code,
                error=facts.error,
                product=product,
            )
            self.listed[job.id] = (key, product, summary)
            listed.append(summary)
        return listed

    def listed_locks(self) -> list[tuple[int, int]]:
        """The DAG's locks, sorted, for a small artifact's status (built once: they never
        change once bound)."""
        assert self.graph is not None
        if self.sorted_locks is None:
            self.sorted_locks = sorted(self.graph.locks)
        return self.sorted_locks

    def set_jobs(self, jobs: list[JobStatus]) -> None:
        self.jobs = jobs
        self.counts = Counter(status.state for status in jobs)

    def set_job(self, job_id: int, status: JobStatus) -> None:
        """Change one job's status, keeping the per-state counts current in O(1)."""
        self.counts[self.jobs[job_id].state] -= 1
        self.counts[status.state] += 1
        self.jobs[job_id] = status


Outgoing = tuple[str, BaseModel, bool]  # topic, message, retain


def _ids(message: Any) -> dict[str, Any]:
    """The artifact and job a message is about, for the ids on every log line."""
    job = getattr(message, "job", None)
    if isinstance(job, JobRef):
        return {"artifact_id": job.artifact_id, "job_id": job.job_id, "attempt": job.attempt}
    artifact_id = getattr(message, "artifact_id", None) or (
        message.id if isinstance(message, Artifact) else None
    )
    return {"artifact_id": artifact_id} if artifact_id else {}


def _ref(node: NodePresence) -> NodeRef:
    return NodeRef(id=node.node, offers=node.labels, executors=node.executors)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while binding builds a graph.

    Binding 100,000 jobs allocates millions of objects that all live on; the collections
    they trigger meanwhile free nothing and took about 40% of binding's time. Reference
    counting still frees everything else; the collector resumes as it was afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _needs_data(step: Step) -> bool:
    """Whether a step binds jobs to the workers holding the project's data."""
    if isinstance(step, Iterate):
        return any(_needs_data(inner) for inner in step.steps)
    return isinstance(step, Parallel | Sequential)


class Scheduler:
    """The scheduler service. `start()` resumes unfinished artifacts and serves."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.db = Database(config.database)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._out: list[Outgoing] = []
        self._changed: set[str] = set()
        self._released: dict[str, list[tuple[int, int]]] = {}
        self._acks: dict[str, list[JobRef]] = {}
        self._recorded: list[tuple[_Artifact, float]] = []  # statuses to build, with their time
        self._deferred: dict[str, float] = {}  # artifact → when its folded status is due
        self._acks_due: float | None = None  # when the oldest pending acknowledgement is due
        self._artifacts: dict[str, _Artifact] = {}
        self._nodes: dict[str, NodePresence] = {}
        self._started_at = time.monotonic()
        # Everything received up to this moment has been handled: the clock periodic
        # re-sends count on, so a backlog in our own inbox never passes for a silent worker.
        self._caught_up = time.monotonic()
        self._arrived = 0.0  # when the message being handled arrived
        self._burst_at = time.monotonic()  # when the burst being handled began
        self._store: ResourceStore | None = None  # made when first needed
        # Per worker: when its last event arrived, and the latest dispatch it answered.
        self._heard: dict[str, float] = {}
        self._answered: dict[str, float] = {}
        self._stopping = threading.Event()
        self.metrics = SchedulerMetrics()
        self.metrics_server: MetricsServer | None = None
        self._thread = threading.Thread(target=self._serve, name="scheduler", daemon=True)
        self.bus = Bus(
            client_id=config.name,
            config=config.broker.bus_config(),
            on_message=lambda topic, payload: self._inbox.put(
                ("message", (topic, payload, time.monotonic()))
            ),
            subscriptions=[topics.ALL_REQUESTS, topics.ALL_EVENTS, topics.ALL_PRESENCE],
            on_connect=lambda session: self._inbox.put(("connected", session)),
            threaded=False,  # driven by the scheduler thread: see the module's docstring
        )
        self.initiator: WorkerAgent | None = None
        if config.run_initiator:
            self.initiator = WorkerAgent(
                WorkerConfig(
                    name=config.initiator,
                    broker=config.initiator_broker or config.broker,
                    storage=config.storage,
                    initiator=True,
                    max_jobs=4,
                    plugins=config.initiator_plugins,
                    state_dir=config.database.parent / f"{config.initiator}.state",
                    resend_interval=config.resend_interval,
                    # Beat often enough that the scheduler's own grace never loses it.
                    heartbeat_interval=min(5.0, config.heartbeat_grace / 3),
                )
            )

    def start(self, wait: float | None = 10.0) -> Scheduler:
        self._resume()
        self._thread.start()
        self.bus.start(wait=wait)
        if self.initiator is not None:
            self.initiator.start(wait=wait)
        if self.config.metrics_port is not None:
            self.metrics_server = MetricsServer(
                self.metrics, self.config.metrics_port, sample=scheduler_sampler(self)
            ).start()
        return self

    def stop(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.initiator is not None:
            self.initiator.stop()
        self._stopping.set()
        self._inbox.put(("stop", None))
        self.bus.wake()
        self._thread.join(timeout=10)
        self.bus.stop()
        self.db.close()

    def call(self, function: Callable[[], Any]) -> None:
        """Run `function` on the scheduler thread (tests use it to inspect state safely)."""
        self._inbox.put(("call", function))
        self.bus.wake()

    # --- the scheduler thread --------------------------------------------------------------

    def _serve(self) -> None:
        next_tick = time.monotonic() + TICK
        while not self._stopping.is_set():
            burst: list[tuple[str, Any]] = []
            timers = min(next_tick, *self._deferred.values()) if self._deferred else next_tick
            wake = timers if self._acks_due is None else min(timers, self._acks_due)
            if self._inbox.empty():  # read the socket, waiting until then at most
                self.bus.pump(max(0.0, wake - time.monotonic()))
            try:
                while len(burst) < BURST:
                    burst.append(self._inbox.get_nowait())
            except queue.Empty:
                self._caught_up = time.monotonic()  # the inbox is drained
            else:
                # Cut at BURST with more waiting: caught up to the last message taken.
                arrivals = [item[2] for kind, item in burst if kind == "message"]
                if arrivals:
                    self._caught_up = arrivals[-1]
            self._burst_at = time.monotonic()
            # Woken by acknowledgements alone (the broker's, or ours falling due): nothing
            # to write, so no transaction (its locks cost four system calls).
            quiet = not burst and self._burst_at < timers
            try:
                with contextlib.nullcontext() if quiet else self.db.transaction():
                    for kind, item in burst:
                        self._handle(kind, item)
                    if not quiet and time.monotonic() >= next_tick:
                        self._tick()
                        next_tick = time.monotonic() + TICK
                    self._collect_status()
            except Exception:
                log.exception("scheduler: a burst of %d messages failed", len(burst))
                self._out.clear()
                self._recorded.clear()
                continue
            self._publish()
            self.bus.acknowledge()  # what the burst handled is committed: the broker may forget it
            # The statuses are built once the jobs the burst made ready are on their way.
            self._build_statuses()
            self._publish()

    def _publish(self) -> None:
        """Publish what was decided: the jobs made ready first, batched per worker."""
        out, self._out = self._out, []
        jobs: dict[str, list[JobReady]] = {}
        rest: list[Outgoing] = []
        for topic, message, retain in out:
            if isinstance(message, JobReady):
                jobs.setdefault(topic, []).append(message)
            else:
                rest.append((topic, message, retain))
        for topic, batch in jobs.items():
            try:
                self.bus.publish_many(topic, batch)
            except Exception:
                log.exception("scheduler: could not publish on %s", topic)
        for topic, message, retain in rest:
            try:
                self.bus.publish(topic, message, retain=retain)
            except Exception:
                log.exception("scheduler: could not publish on %s", topic)

    def _handle(self, kind: str, item: Any) -> None:
        if kind == "message":
            topic, payload, self._arrived = item
            try:
                address, message = decode(topic, payload)
            except ProtocolError as exc:
                log.error("scheduler rejected a message: %s", exc)
                self._reject(topic, str(exc))
                return
            for part in unbatch(message):
                try:
                    # Acceptances and heartbeats write nothing to the database: no savepoint.
                    read_only = isinstance(part, READ_ONLY)
                    undo = contextlib.nullcontext() if read_only else self.db.savepoint()
                    with undo, log_context(**_ids(part)):
                        self._dispatch_message(address, part)
                except Exception as exc:
                    log.exception("scheduler: error handling %s", topic)
                    self._reject(topic, f"internal error: {exc}")
        elif kind == "connected":
            self._resend(only_worker=None)
        elif kind == "call":
            item()

    def _reject(self, topic: str, error: str) -> None:
        try:
            address = topics.parse(topic)
        except topics.TopicError:
            return
        if address.channel in (Channel.SUBMIT, Channel.CANCEL):
            self._out.append(
                (topics.reply(address.name), RequestRejected(topic=topic, error=error), False)
            )

    def _dispatch_message(self, address: Address, message: Any) -> None:
        if address.channel is Channel.SUBMIT:
            self._submit(message, client=address.name)
        elif address.channel is Channel.CANCEL:
            self._cancel(message)
        elif address.channel is Channel.PRESENCE:
            self._presence(address.name, message)
        elif address.channel is Channel.EVENTS:
            self._event(address.name, message)
        else:
            log.error("scheduler: unexpected %s message", address.channel)

    # --- artifacts -------------------------------------------------------------------------

    def _submit(self, artifact: Artifact, client: str) -> None:
        if self.db.artifact_exists(artifact.id):
            # A re-sent submission: answer with the current status, change nothing.
            self._changed.add(artifact.id)
            return
        now = time.time()
        self.db.insert_artifact(artifact, client, now)
        self._artifacts[artifact.id] = _Artifact(
            artifact, client, ArtifactState.SUBMITTED, 0, submitted_at=now
        )
        self.metrics.artifact(ArtifactState.SUBMITTED)
        self._changed.add(artifact.id)
        self._try_bind(artifact.id)

    def _try_bind(self, artifact_id: str) -> None:
        record = self._artifacts[artifact_id]
        artifact = record.artifact
        workers = [node for node in self._nodes.values() if not node.initiator]
        holders = sorted(
            (n for n in workers if artifact.project in n.projects), key=lambda n: n.node
        )
        # Workflow tasks may run on any worker offering their executor; online ones first.
        pool = sorted((n for n in workers if n.executors), key=lambda n: (not n.online, n.node))
        context = SchedulerContext(
            initiator=NodeRef(id=self.config.initiator),
            workers=[_ref(n) for n in holders],
            pool=[_ref(n) for n in pool],
        )
        try:
            with _gc_paused():
                graph = bind(artifact, context)
            self._check_operations(graph)
        except (BindingError, operations.OperationError) as exc:
            if time.monotonic() - self._started_at < self.config.worker_grace:
                return  # presence may still be arriving; _tick tries again
            if not holders and any(_needs_data(step) for step in artifact.steps):
                self._fail(
                    record, "NoWorkers", f"no worker holds data for project {artifact.project}"
                )
            else:
                self._fail(record, type(exc).__name__, str(exc))
            return
        with _gc_paused():
            self.db.bind_artifact(artifact.id, context, graph)
            self._start(record, graph, completed=[])
        self._transition(record, ArtifactState.RUNNING)
        for job_id in record.locks.ready() if record.locks else []:
            self._ready(record, job_id)

    def _check_operations(self, graph: JobGraph) -> None:
        """Refuse at submission what a node could only refuse at run time."""
        seen: set[tuple[str, str]] = set()
        for job in graph.jobs:
            if job.kind == "tasks":
                if job.operation.params.get("replica"):
                    continue  # a task's replicas differ only in their index: one check is enough
                try:  # the worker was chosen for its executor; its params are checked here
                    check_task(Task.model_validate(job.operation.params))
                except ValueError as exc:
                    raise BindingError(str(exc)) from None
                continue
            if (job.worker, job.operation.name) in seen:
                continue
            seen.add((job.worker, job.operation.name))
            node = self._nodes.get(job.worker)
            if node is not None and job.operation.name not in node.operations:
                raise operations.OperationError(
                    f"operation {job.operation.name!r} is not available on {job.worker}"
                )
            if job.operation.name in operations.REGISTRY:
                operations.lookup(job.operation)  # validates the parameters

    def _start(self, record: _Artifact, graph: JobGraph, completed: list[int]) -> None:
        record.graph = graph
        record.locks = LockTable(graph, completed)
        if not record.jobs:
            record.set_jobs([JobStatus() for _ in graph.jobs])

    def _transition(self, record: _Artifact, state: ArtifactState) -> None:
        record.state = state
        self.metrics.artifact(state)
        self._changed.add(record.artifact.id)

    def _fail(
        self,
        record: _Artifact,
        kind: str,
        message: str,
        job: int | None = None,
        error: RemoteError | None = None,
    ) -> None:
        record.error = error or RemoteError(type=kind, message=message)
        record.failed_job = job
        self._stop_jobs(record)
        self._transition(record, ArtifactState.FAILED)

    def _cancel(self, request: CancelArtifact) -> None:
        record = self._artifacts.get(request.artifact_id)
        if record is None:
            self._changed.add(request.artifact_id)  # answer with its (final) status
            return
        record.error = RemoteError(type="Cancelled", message=request.reason)
        self._stop_jobs(record)
        self._transition(record, ArtifactState.CANCELLED)

    def _stop_jobs(self, record: _Artifact) -> None:
        """Cancel every unfinished job; tell workers running one to stop it."""
        for job_id, status in enumerate(record.jobs):
            if status.final:
                continue
            if status.state in (JobState.DISPATCHED, JobState.RUNNING) and record.graph:
                ref = JobRef(artifact_id=record.artifact.id, job_id=job_id, attempt=status.attempt)
                self._out.append((topics.control(record.worker(job_id)), CancelJob(job=ref), False))
            record.set_job(job_id, status.cancel())
        self.db.cancel_jobs(record.artifact.id)

    # --- jobs ------------------------------------------------------------------------------

    def _ready(self, record: _Artifact, job_id: int) -> None:
        if record.jobs[job_id].state is not JobState.WAITING:
            return  # cancelled, as the descendant of a failed task
        record.set_job(job_id, record.jobs[job_id].ready())
        self._send(record, job_id)

    def _send(self, record: _Artifact, job_id: int) -> None:
        """Dispatch a ready job: a new attempt, recorded before it is published."""
        assert record.graph is not None
        status = record.jobs[job_id].dispatch()
        record.set_job(job_id, status)
        self.db.update_job(record.artifact.id, job_id, status.state, status.attempt)
        record.dispatched_at.pop(job_id, None)  # kept in dispatch order: see _resend
        record.dispatched_at[job_id] = self._burst_at
        self.metrics.dispatched()
        self._out.append(self._job_ready(record, job_id))

    def _job_ready(self, record: _Artifact, job_id: int) -> Outgoing:
        assert record.graph is not None
        job = record.graph.jobs[job_id]
        # Built from values validated on their way in: no need to validate them again.
        message = JobReady.model_construct(
            artifact_id=record.artifact.id,
            job_id=job_id,
            attempt=record.jobs[job_id].attempt,
            project=record.artifact.project,
            seed=record.artifact.seed,
            step=job.step,
            kind=job.kind,
            role=job.role,
            iteration=job.iteration,
            operation=job.operation,
            inputs=[record.products[p] for p in record.graph.consumes(job_id)],
        )
        return topics.jobs(record.worker(job_id)), message, False

    def _event(self, worker: str, event: Any) -> None:
        if isinstance(event, JobHeartbeat):
            self._heartbeat(worker, event)
            return
        self._heard[worker] = self._arrived
        ref: JobRef = event.job
        final = isinstance(event, JobFinished | JobFailed)
        record = self._artifacts.get(ref.artifact_id)
        if record is not None and record.jobs and ref.job_id < len(record.jobs):
            sent = record.dispatched_at.get(ref.job_id)
            if sent is not None and record.jobs[ref.job_id].attempt == ref.attempt:
                self._answered[worker] = max(self._answered.get(worker, 0.0), sent)
        if record is None or record.graph is None:
            if final and self.db.artifact_exists(ref.artifact_id):
                self._ack(worker, ref)  # the artifact is over: stop the worker re-sending
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
        status = record.jobs[ref.job_id]
        if final:
            self._ack(worker, ref)
        try:
            if isinstance(event, JobAccepted):
                if status.attempt == ref.attempt:
                    record.accepted.add(ref.job_id)
            elif isinstance(event, JobStarted):
                if status.state is JobState.DISPATCHED:
                    record.set_job(ref.job_id, status.start(ref.attempt))
                    self._changed.add(ref.artifact_id)
                    record.accepted.add(ref.job_id)
                    sent = record.dispatched_at.get(ref.job_id)
                    self.metrics.started(None if sent is None else self._arrived - sent)
                    record.started_at[ref.job_id] = record.last_seen[ref.job_id] = time.monotonic()
                    record.note(ref.job_id, started_at=event.at)
                    self.db.update_job(
                        ref.artifact_id,
                        ref.job_id,
                        JobState.RUNNING,
                        ref.attempt,
                        started_at=event.at,
                    )
            elif isinstance(event, JobFinished):
                self._finished(record, event, status)
            elif isinstance(event, JobFailed):
                if status.attempt != ref.attempt or status.final:
                    return  # a late or repeated failure report: already handled
                if status.state is JobState.DISPATCHED and event.started_at is not None:
                    ran_for = event.finished_at - event.started_at
                    self._started_unannounced(record, ref.job_id, ran_for)
                self._job_failed(record, ref, event.error, event.finished_at, event.exit_code)
            elif isinstance(event, JobProgress):
                log.info("job %s/%s: %s", ref.artifact_id, ref.job_id, event.message)
        except (StaleAttempt, IllegalTransition) as exc:
            # A duplicate or a late event of an abandoned attempt: it changes nothing.
            log.debug("scheduler: ignored %s from %s: %s", event.event, worker, exc)

    def _heartbeat(self, worker: str, beat: JobHeartbeat) -> None:
        self._heard[worker] = self._arrived
        now = time.monotonic()
        for ref in beat.jobs:
            record = self._artifacts.get(ref.artifact_id)
            if record is None or record.graph is None or ref.job_id >= len(record.jobs):
                continue
            if record.worker(ref.job_id) != worker:
                continue
            if record.jobs[ref.job_id].attempt == ref.attempt:
                record.last_seen[ref.job_id] = now

    def _job_failed(
        self,
        record: _Artifact,
        ref: JobRef,
        error: RemoteError,
        finished_at: float,
        exit_code: int | None = None,
    ) -> None:
        """A failed attempt: retry it with backoff while the step allows, else fail it all.

        A failed workflow task fails the artifact but stops only its descendants: the
        independent branches go on, and the artifact ends when they have.
        """
        assert record.graph is not None
        job = record.graph.jobs[ref.job_id]
        status = record.jobs[ref.job_id]
        record.note(
            ref.job_id,
            finished_at=finished_at,
            exit_code=exit_code,
            error=f"{error.type}: {error.message}"[:300],
        )
        if ref.attempt <= job.retries:
            log.warning(
                "job %s/%s attempt %d failed (%s: %s): retrying",
                ref.artifact_id,
                ref.job_id,
                ref.attempt,
                error.type,
                error.message,
            )
            self._retry(record, ref.job_id, status.requeue(ref.attempt))
            return
        record.set_job(ref.job_id, status.fail(ref.attempt))
        self.metrics.failed()
        self._forget_attempt(record, ref.job_id)
        self.db.update_job(
            ref.artifact_id,
            ref.job_id,
            JobState.FAILED,
            ref.attempt,
            finished_at=finished_at,
            error=error,
        )
        if job.kind != "tasks":
            self._fail(record, error.type, error.message, ref.job_id, error)
            return
        if record.error is None:
            record.error, record.failed_job = error, ref.job_id
        for descendant in nx.descendants(record.graph.graph, ref.job_id):
            if not record.jobs[descendant].final:
                record.set_job(descendant, record.jobs[descendant].cancel())
                self.db.update_job(record.artifact.id, descendant, JobState.CANCELLED, 0)
        self._changed.add(record.artifact.id)
        self._settle(record)

    def _settle(self, record: _Artifact) -> None:
        """End the artifact once every job is final: failed if any task failed."""
        final = sum(record.counts[state] for state in JOB_FINAL)
        if final == len(record.jobs):
            failed = record.error is not None
            self._transition(record, ArtifactState.FAILED if failed else ArtifactState.COMPLETED)

    def _retry(self, record: _Artifact, job_id: int, requeued: JobStatus) -> None:
        """Make the job ready again and dispatch it after a jittered exponential backoff."""
        record.set_job(job_id, requeued)
        self.metrics.retried()
        self._forget_attempt(record, job_id)
        self.db.update_job(record.artifact.id, job_id, JobState.READY, requeued.attempt)
        delay = min(
            self.config.retry_backoff_max,
            self.config.retry_backoff * 2 ** max(0, requeued.attempt - 1),
        )
        record.retry_at[job_id] = time.monotonic() + delay * random.uniform(0.5, 1.0)
        self._changed.add(record.artifact.id)

    def _forget_attempt(self, record: _Artifact, job_id: int) -> None:
        for timers in (record.dispatched_at, record.resent_at, record.started_at, record.last_seen):
            timers.pop(job_id, None)
        record.accepted.discard(job_id)

    def _finished(self, record: _Artifact, event: JobFinished, status: JobStatus) -> None:
        ref = event.job
        if status.state is JobState.DISPATCHED and status.attempt == ref.attempt:
            self._started_unannounced(record, ref.job_id, event.finished_at - event.started_at)
        record.set_job(ref.job_id, status.complete(ref.attempt))
        self.metrics.completed(event.finished_at - event.started_at)
        record.products[ref.job_id] = event.product
        self._forget_attempt(record, ref.job_id)
        record.note(
            ref.job_id,
            started_at=event.started_at,
            finished_at=event.finished_at,
            size=event.product.size,
            exit_code=event.exit_code,
        )
        self.db.update_job(
            ref.artifact_id,
            ref.job_id,
            JobState.COMPLETED,
            ref.attempt,
            started_at=event.started_at,
            finished_at=event.finished_at,
            product=event.product,
        )
        assert record.locks is not None and record.graph is not None
        unlocked = record.locks.release(ref.job_id)
        self._released.setdefault(ref.artifact_id, []).extend(
            (ref.job_id, j) for j in record.graph.unlocks(ref.job_id)
        )
        self._changed.add(ref.artifact_id)
        for job_id in unlocked:
            self._ready(record, job_id)
        self._settle(record)

    def _started_unannounced(self, record: _Artifact, job_id: int, ran_for: float) -> None:
        """Count the start of an attempt whose result came before any JobStarted.

        Workers announce only the jobs still running a moment after they started. For a
        quick one, the dispatch latency is the time to its result less the time it ran:
        a difference of the worker's own clock, so no skew between clocks enters.
        """
        sent = record.dispatched_at.get(job_id)
        self.metrics.started(None if sent is None else max(0.0, self._arrived - sent - ran_for))

    def _ack(self, worker: str, ref: JobRef) -> None:
        self._acks.setdefault(worker, []).append(ref)

    # --- presence and timers -----------------------------------------------------------------

    def _presence(self, node: str, presence: NodePresence) -> None:
        if presence.node != node:
            log.error("scheduler: presence on %s names %s: ignored", node, presence.node)
            return
        came_online = presence.online and not (node in self._nodes and self._nodes[node].online)
        self._nodes[node] = presence
        self.db.save_node(presence)
        if came_online:
            # The worker may have restarted and forgotten what it held: ask again for
            # everything it was given; it answers duplicates with what it knows.
            self._resend(only_worker=node, include_accepted=True)
            self._bind_waiting()

    def _bind_waiting(self) -> None:
        for artifact_id, record in list(self._artifacts.items()):
            if record.state is ArtifactState.SUBMITTED:
                self._try_bind(artifact_id)

    def _resend(
        self, only_worker: str | None, older_than: float = 0.0, include_accepted: bool = False
    ) -> None:
        """Re-send JobReady for dispatched jobs their worker has not acknowledged yet.

        Broker persistence is not end to end: a broker crash can lose a job it accepted.
        A periodic re-send (`older_than` > 0) is for a job that looks lost: unanswered
        for `older_than` while its worker answered a job dispatched after it (a worker
        handles its jobs in order), or said nothing at all for that long. Both count on the
        caught-up clock (what this scheduler has handled so far). A worker busy with a
        long queue, or a backlog in this scheduler's own inbox, is no sign of loss:
        counting on the wall clock, they looked like silence, the scheduler re-sent jobs
        by the thousand, and the duplicates made the backlogs longer.
        """
        now = time.monotonic()
        for record in self._artifacts.values():
            if record.graph is None:
                continue
            for job_id, sent in list(record.dispatched_at.items()):
                if older_than > 0 and self._caught_up - sent < older_than:
                    break  # in dispatch order: every job after this one is younger still
                last = record.resent_at.get(job_id, sent)
                if older_than > 0 and self._caught_up - last < older_than:
                    continue
                if job_id in record.accepted and not include_accepted:
                    continue
                worker = record.worker(job_id)
                if older_than > 0 and not self._maybe_lost(worker, sent, last, older_than):
                    continue
                if only_worker is not None and worker != only_worker:
                    continue
                if record.jobs[job_id].state not in (JobState.DISPATCHED, JobState.RUNNING):
                    continue
                record.resent_at[job_id] = now
                self._out.append(self._job_ready(record, job_id))

    def _maybe_lost(self, worker: str, sent: float, last: float, older_than: float) -> bool:
        """Whether a job dispatched at `sent`, last sent at `last` and not answered since
        may have been lost: its worker answered a job dispatched after it, or said
        nothing at all for `older_than`. A re-send is not a dispatch: answering one says
        nothing of the jobs queued before it (counting it so re-sent whole queues)."""
        clock = self._caught_up
        if clock - last < older_than:
            return False
        if self._answered.get(worker, 0.0) > sent:
            return True
        return clock - max(self._heard.get(worker, 0.0), last) >= older_than

    def _tick(self) -> None:
        self._resend(only_worker=None, older_than=self.config.resend_interval)
        self._bind_waiting()
        now = time.monotonic()
        for record in list(self._artifacts.values()):
            if record.graph is None or record.state is not ArtifactState.RUNNING:
                continue
            deadline = record.artifact.deadline
            if deadline is not None and time.time() > record.submitted_at + deadline:
                self._fail(
                    record,
                    "DeadlineExceeded",
                    f"artifact not done within its deadline of {deadline} s",
                )
                continue
            for job_id, due in list(record.retry_at.items()):
                if now >= due:
                    del record.retry_at[job_id]
                    self._send(record, job_id)
            self._check_running(record, now)

    def _check_running(self, record: _Artifact, now: float) -> None:
        """Stop attempts over their timeout; move jobs that hold no data off a lost node.

        The policy per step type: a worker's data job waits for its worker (until the
        artifact's deadline), since only that worker holds the data; an initiator job is
        run again; a workflow task moves to another worker able to run it.
        """
        assert record.graph is not None
        # A job nobody announced as started can only be lost with an offline node.
        offline = any(not node.online for node in self._nodes.values())
        for job_id in list(record.dispatched_at if offline else record.started_at):
            job = record.graph.jobs[job_id]
            worker = record.worker(job_id)
            status = record.jobs[job_id]
            started = record.started_at.get(job_id)
            ref = JobRef(artifact_id=record.artifact.id, job_id=job_id, attempt=status.attempt)
            if job.timeout is not None and started is not None and now - started > job.timeout:
                self._out.append((topics.control(worker), CancelJob(job=ref), False))
                error = RemoteError(
                    type="TimeoutError",
                    message=f"job {job_id} ran over its timeout of {job.timeout} s",
                )
                self._job_failed(record, ref, error, time.time())
                continue
            if not job.relocatable:
                continue
            node = self._nodes.get(worker)
            silent = started is not None and now - record.last_seen.get(job_id, started) > (
                self.config.heartbeat_grace
            )
            if not ((node is not None and not node.online) or silent):
                continue
            lost = record.lost_attempts[job_id] = record.lost_attempts.get(job_id, 0) + 1
            if lost >= self.config.max_lost_attempts:
                message = f"job {job_id} lost its node {worker} {lost} times"
                self._fail(record, "WorkerLost", message, job_id)
                return
            self._out.append((topics.control(worker), CancelJob(job=ref), False))
            if job.kind == "tasks":
                self._move(record, job_id, away_from=worker)
            log.warning(
                "job %s/%s lost with %s: retrying on %s",
                record.artifact.id,
                job_id,
                worker,
                record.worker(job_id),
            )
            self._retry(record, job_id, status.requeue(status.attempt))

    def _move(self, record: _Artifact, job_id: int, away_from: str) -> None:
        """Give a task to another online worker able to run it, if there is one."""
        assert record.graph is not None
        task = Task.model_validate(record.graph.jobs[job_id].operation.params)
        pool = [
            _ref(n)
            for name, n in sorted(self._nodes.items())
            if n.online and not n.initiator and name != away_from
        ]
        able = candidates(task, pool)
        if able:
            record.assigned[job_id] = able[job_id % len(able)].id
            self.db.assign_job(record.artifact.id, job_id, record.assigned[job_id])

    def _collect_status(self) -> None:
        """Turn what this burst changed into the messages that announce it.

        Acknowledgements wait up to ACK_DELAY (or ACK_BATCH of them). A changed
        artifact's status is recorded (its new seq and state, in this transaction) and
        built by `_build_statuses` after the commit, with the locks released since its last
        status; while only its jobs' progress changed, it waits until STATUS_INTERVAL after
        its last status.
        """
        now = time.monotonic()
        if self._acks:
            due = self._acks_due = self._acks_due or now + ACK_DELAY
            for worker, refs in list(self._acks.items()):
                if due <= now or len(refs) >= ACK_BATCH:
                    self._out.append((topics.control(worker), EventAck(jobs=refs), False))
                    del self._acks[worker]
            if not self._acks:
                self._acks_due = None
        for artifact_id, due in list(self._deferred.items()):
            if due <= now:
                del self._deferred[artifact_id]
                self._changed.add(artifact_id)
        for artifact_id in self._changed:
            record = self._artifacts.get(artifact_id) or self._load(artifact_id)
            if record is None:
                continue
            if record.state is record.announced and artifact_id in self._artifacts:
                due = record.announced_at + STATUS_INTERVAL
                if due > now:
                    self._deferred.setdefault(artifact_id, due)
                    continue
            self._deferred.pop(artifact_id, None)
            record.announced, record.announced_at = record.state, now
            released = self._released.pop(artifact_id, None)
            if released:
                message = LocksReleased(artifact_id=artifact_id, locks=released)
                self._out.append((topics.locks(artifact_id), message, False))
            record.seq += 1
            wall = time.time()
            self.db.update_artifact(
                artifact_id, record.state, record.seq, wall, record.error, record.failed_job
            )
            self._recorded.append((record, wall))
            if record.state in ARTIFACT_FINAL:
                self._artifacts.pop(artifact_id, None)  # the database keeps it
        self._changed.clear()

    def _build_statuses(self) -> None:
        """Queue the statuses `_collect_status` recorded (committed by now)."""
        recorded, self._recorded = self._recorded, []
        for record, now in recorded:
            try:
                status = self._status(record, now)
            except Exception:
                log.exception("scheduler: could not build the status of %s", record.artifact.id)
                continue
            self._out.append((topics.status(record.artifact.id), status, True))

    def _results_manifest(self, artifact_id: str, results: list[Resource]) -> Resource:
        """Store the list of an artifact's results; the status carries where it is."""
        if self._store is None:
            self._store = ResourceStore(self.config.storage.url, self.config.storage.options)
        data = json.dumps([r.model_dump(mode="json") for r in results]).encode()
        return self._store.put(
            self._store.results_url(artifact_id), data, media_type=RESULTS_MANIFEST
        )

    def _status(self, record: _Artifact, now: float) -> ArtifactStatus:
        artifact_id = record.artifact.id
        counts = {state: n for state, n in record.counts.items() if n}
        results: list[Resource] = []
        if record.state is ArtifactState.COMPLETED and self.config.allow_download and record.graph:
            results = [record.products[j] for j in record.graph.sinks()]
            if len(results) > LISTED_JOBS:  # too many for a message: one manifest of them
                try:
                    results = [self._results_manifest(artifact_id, results)]
                except Exception:  # the artifact's end is announced all the same
                    log.exception("scheduler: could not store the results of %s", artifact_id)
                    results = []
        jobs = record.summaries()
        # Small artifacts carry their DAG's locks beside the job list, for drawing it.
        locks = record.listed_locks() if jobs is not None and record.graph else None
        return ArtifactStatus(
            artifact_id=artifact_id,
            project=record.artifact.project,
            state=record.state,
            seq=record.seq,
            total=len(record.jobs),
            counts=counts,
            error=record.error,
            failed_job=record.failed_job,
            results=results,
            jobs=jobs,
            locks=locks,
            updated_at=now,
        )

    # --- resuming ------------------------------------------------------------------------------

    def _resume(self) -> None:
        """Rebuild every unfinished artifact from the database (after a crash or restart)."""
        self._nodes = {
            node.node: node.model_copy(update={"online": False}) for node in self.db.nodes()
        }
        with self.db.transaction():
            for artifact_id in self.db.unfinished_artifacts():
                record = self._load(artifact_id)
                assert record is not None
                self._artifacts[artifact_id] = record
                self._changed.add(artifact_id)
                now = time.monotonic()
                for job_id, status in enumerate(record.jobs):
                    if status.state is JobState.READY:
                        self._send(record, job_id)
                    elif status.state in (JobState.DISPATCHED, JobState.RUNNING):
                        # Whatever was said before the crash, ask again: workers answer
                        # a duplicate with what they know, and re-send their results.
                        record.dispatched_at[job_id] = self._burst_at = now
                        if status.state is JobState.RUNNING:
                            # Its timeout and heartbeat grace count on from the restart.
                            record.started_at[job_id] = record.last_seen[job_id] = now
                        self._out.append(self._job_ready(record, job_id))
            self._collect_status()
        self._build_statuses()

    def _load(self, artifact_id: str) -> _Artifact | None:
        """An artifact's record as the database has it; binding again gives its graph."""
        row = self.db.artifact(artifact_id)
        if row is None:
            return None
        record = _Artifact(
            row.artifact,
            row.client,
            row.state,
            row.seq,
            error=row.error,
            failed_job=row.failed_job,
            submitted_at=row.submitted_at,
        )
        if row.context is not None:
            jobs = self.db.jobs(artifact_id)
            record.set_jobs([JobStatus(j.state, j.attempt) for j in jobs])
            record.products = {j.job_id: j.product for j in jobs if j.product is not None}
            completed = [j.job_id for j in jobs if j.state is JobState.COMPLETED]
            with _gc_paused():
                graph = bind(row.artifact, row.context)
                self._start(record, graph, completed)
            for j in jobs:
                if j.worker != graph.jobs[j.job_id].worker:
                    record.assigned[j.job_id] = j.worker
                record.note(
                    j.job_id,
                    started_at=j.started_at,
                    finished_at=j.finished_at,
                    size=j.product.size if j.product else None,
                    error=f"{j.error.type}: {j.error.message}"[:300] if j.error else None,
                )
        return record
