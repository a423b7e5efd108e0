"""The edge worker agent: receives jobs on its own topic, runs them next to its data.

Threads: the agent thread drives the bus (an unthreaded Bus: it reads the socket
itself). New jobs go to the runners as they are read (decoded, deduplicated and
journaled); everything else is queued and handled in bursts: what is queued is taken
(never waiting for more), handled inside one journal transaction, committed, then the
events the burst produced are sent. Runners (`max_jobs` threads) run jobs in order and
send their results themselves, writing them to the socket at once. Events go out in
batches through one outbox: whichever thread finds nothing being sent sends what is
waiting, so a lone result leaves at once from its runner and results that pile up
meanwhile leave together.

The agent announces jobs still running STARTED_AFTER after they started (a quick job's
result is its only event), looking at most once per STARTED_AFTER, so that a worker
running a job a millisecond does not wake its agent per job. A finished or failed event
is published, then journaled (its write off the result's way to the scheduler), and
re-sent on every reconnect, and when it looks lost, until the scheduler acknowledges it,
so a result survives a lost connection and a restart of the worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flotta_mqtt.logs import log_context
from flotta_mqtt.model import SafeId
from flotta_mqtt.protocol import (
    CancelJob,
    EventAck,
    JobAccepted,
    JobFailed,
    JobFinished,
    JobHeartbeat,
    JobReady,
    JobStarted,
    NodePresence,
    ProtocolError,
    RemoteError,
    WorkerEvent,
    decode,
    topics,
    unbatch,
)
from flotta_mqtt.roles import operations
from flotta_mqtt.roles.config import BrokerSettings, StorageSettings
from flotta_mqtt.roles.executors import TaskError, TaskRunner
from flotta_mqtt.roles.executors.python import PythonExecutor
from flotta_mqtt.roles.worker.journal import Final, Journal
from flotta_mqtt.transport.bus import Bus, Will
from flotta_mqtt.transport.store import ResourceStore

log = logging.getLogger(__name__)

JobKey = tuple[str, int]  # (artifact id, job id)
MAX_BACKOFF = 16  # a result unacknowledged for long is re-sent every 16 resend intervals
# A job still running this long after it started is announced (JobStarted); one that has
# finished by then is not: its result says when it started, and a message per job is saved.
STARTED_AFTER = 0.05
BURST = 500  # the most inbox items handled in one journal transaction
# A result finished while other jobs wait their turn may wait this long for the results
# after it: a busy worker sends a message per batch of results, not per job.
BATCH_WINDOW = 0.01
# json.dumps(product, allow_nan=False) builds an encoder per call; one is enough.
_PRODUCT_JSON = json.JSONEncoder(allow_nan=False)


class WorkerConfig(BaseModel):
    """A worker's settings, from a YAML file, flags or FLOTTA_* variables."""

    model_config = ConfigDict(extra="forbid")

    name: SafeId
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    # project → its CSV/Parquet files, or {paths, min_group_size, types}
    datasets: dict[SafeId, operations.DatasetSpec] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    max_jobs: int = Field(default=2, ge=1, le=1024)
    plugins: list[str] = Field(default_factory=list)  # modules registering more operations
    # Where the worker keeps the jobs it holds and its unacknowledged results across a
    # restart; without one it remembers them only while it runs.
    state_dir: Path | None = None
    resend_interval: float = Field(default=5.0, gt=0)
    heartbeat_interval: float = Field(default=5.0, gt=0)
    # Workflow task executors this worker runs (shell, docker, kube, api). None by default:
    # a task is code sent from elsewhere, so a worker runs tasks only when told it may.
    executors: list[str] = Field(default_factory=list)
    # Whether this worker runs code shipped by callers (`@distributed` functions, the
    # `python` executor). Off by default: without it the worker neither offers nor runs
    # that executor, even when `executors` names it.
    allow_code: bool = False
    initiator: bool = False  # the scheduler's own runner: holds no data


@dataclass
class _Attempt:
    job: JobReady
    cancelled: threading.Event = field(default_factory=threading.Event)
    running: bool = False
    final: Final | None = None
    sent_at: float = 0.0  # monotonic time the final event was last published
    first_sent: float = 0.0  # monotonic time the final event was first published
    started_at: float = 0.0  # wall clock time the current run started
    announced: bool = False  # JobStarted published for it
    resends: int = 0  # periodic re-sends of the final event so far (each waits twice longer)


class WorkerAgent:
    """One worker node. `start()` connects and serves; `stop()` says goodbye."""

    def __init__(self, config: WorkerConfig) -> None:
        operations.load_plugins(config.plugins)
        self.config = config
        self.name = config.name
        self.store = ResourceStore(config.storage.url, config.storage.options)
        self.journal = Journal(config.state_dir)
        runnable = [e for e in config.executors if e != "python" or config.allow_code]
        if len(runnable) < len(config.executors):
            log.warning("worker %s: the python executor needs allow_code: true", self.name)
        self.tasks = TaskRunner(self.store, runnable)
        self._python = self.tasks.executors.get("python")
        if isinstance(self._python, PythonExecutor):
            self._python.setup(
                config.name, config.broker, config.storage, config.state_dir, config.allow_code
            )
        self._datasets = {
            project: operations.FileDataset(project, config.name, spec)
            for project, spec in config.datasets.items()
        }
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._outgoing: list[WorkerEvent] = []  # the events of the burst being handled
        self._jobs_topic = topics.jobs(self.name)
        self._taken: list[_Attempt] = []  # jobs read and journaled, for the runners
        self._outbox: list[WorkerEvent] = []  # events waiting to be sent
        self._sending = False  # a thread is sending the outbox
        self._flush_at: float | None = None  # when results held for a batch must go
        self._outbox_lock = threading.Lock()
        # Attempts that started, by when to announce them: runners append, the agent pops.
        self._starting: deque[tuple[float, _Attempt]] = deque()
        self._wakes_at = 0.0  # monotonic time the agent thread wakes at the latest
        self._attempts: dict[JobKey, _Attempt] = {}
        self._queued = 0  # jobs handed to the pool and not yet done
        # When the scheduler last said anything, and the latest first publish of a result
        # it acknowledged (monotonic): what tells a lost result from a busy scheduler.
        self._heard = time.monotonic()
        self._answered = 0.0
        self._lock = threading.Lock()
        # Runners take jobs in order from one queue (None tells one to stop): cheaper per
        # job than an executor's futures, which nobody here waits on.
        self._jobs: queue.SimpleQueue[_Attempt | None] = queue.SimpleQueue()
        self._runners = [
            threading.Thread(target=self._runner, name=f"job-{self.name}-{i}", daemon=True)
            for i in range(config.max_jobs)
        ]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"worker-{self.name}", daemon=True)
        self.bus = Bus(
            client_id=self.name,
            config=config.broker.bus_config(),
            on_message=self._arrived,
            subscriptions=[topics.worker_inbox(self.name)],
            will=Will(topics.presence(self.name), self.presence(online=False)),
            on_connect=lambda session: self._inbox.put(("connected", session)),
            threaded=False,  # driven by the agent thread; runners write their results
        )

    def presence(self, online: bool) -> NodePresence:
        return NodePresence(
            node=self.name,
            online=online,
            initiator=self.config.initiator,
            projects=sorted(self._datasets),
            labels={**self.config.labels, "allow_code": "yes" if self.config.allow_code else "no"},
            operations=sorted(operations.REGISTRY),
            executors=sorted(self.tasks.executors),
            max_jobs=self.config.max_jobs,
            details={project: dataset.describe() for project, dataset in self._datasets.items()},
            since=time.time(),
        )

    def start(self, wait: float | None = 10.0) -> WorkerAgent:
        for runner in self._runners:
            runner.start()
        self._resume()
        self._thread.start()
        self.bus.start(wait=wait)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._tell("stop")
        self._thread.join(timeout=10)
        with self._lock:
            for attempt in self._attempts.values():
                attempt.cancelled.set()
        for _ in self._runners:
            self._jobs.put(None)  # after the queued jobs, which return at once: cancelled
        if isinstance(self._python, PythonExecutor):
            self._python.close()
        self.tasks.close()
        self._send([])  # results held for a batch: journaled and sent before goodbye
        self.bus.stop(goodbye=[(topics.presence(self.name), self.presence(online=False), True)])
        self.journal.close()

    def _resume(self) -> None:
        """Pick up what the journal holds: results to re-send, jobs cut off by a restart."""
        for held in self.journal.held():
            attempt = _Attempt(held.job, final=held.final)
            self._attempts[(held.job.artifact_id, held.job.job_id)] = attempt
            if held.final is None:
                self._submit(attempt)

    # --- agent thread ----------------------------------------------------------------

    def _serve(self) -> None:
        resend_at = time.monotonic() + self.config.resend_interval
        beat_at = time.monotonic() + self.config.heartbeat_interval
        checked_at = 0.0  # when started jobs were last looked at
        while not self._stopping.is_set():
            due = self._wakes_at = min(resend_at, beat_at, self._flush_at or resend_at)
            # Said before looking: a runner adding a job after the look sees a long sleep.
            if self._starting:
                due = min(due, max(self._starting[0][0], checked_at + STARTED_AFTER))
                self._wakes_at = due
            if self._inbox.empty():  # read the socket, waiting until `due` at most
                self.bus.pump(max(0.0, due - time.monotonic()))
            # The jobs read are journaled: acknowledged before a runner starts on one (the
            # acknowledgement's write would otherwise compete with the runner).
            self.bus.acknowledge()
            taken, self._taken = self._taken, []
            for attempt in taken:
                self._submit(attempt)
            burst: list[tuple[str, Any]] = []
            try:
                while len(burst) < BURST:
                    burst.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            self._wakes_at = 0.0  # awake: a job starting now is seen before the next sleep
            # A wake for timers alone writes nothing: no transaction.
            with self.journal.transaction() if burst else contextlib.nullcontext():
                for kind, item in burst:
                    try:
                        self._handle(kind, item)
                    except Exception:
                        log.exception("worker %s: error handling %s", self.name, kind)
            now = time.monotonic()
            if self._starting and self._starting[0][0] <= now:
                checked_at = now
                while self._starting and self._starting[0][0] <= now:
                    self._announce(self._starting.popleft()[1])
            if now >= beat_at:
                self._heartbeat()
                beat_at = now + self.config.heartbeat_interval
            if now >= resend_at:
                self._resend(older_than=self.config.resend_interval)
                resend_at = now + self.config.resend_interval
            # Publishing may wait for room in the window, pumping the bus meanwhile, which
            # takes jobs into the journal: publish after the commit.
            if any(kind == "connected" for kind, _ in burst):
                try:
                    online = self.presence(online=True)
                    self.bus.publish(topics.presence(self.name), online, retain=True)
                except Exception:  # said again on the next connection
                    log.exception("worker %s: presence not published", self.name)
            outgoing, self._outgoing = self._outgoing, []
            flush = self._flush_at is not None and time.monotonic() >= self._flush_at
            if outgoing or flush:
                self._send(outgoing)  # after the commit: what they answer is journaled

    def _tell(self, kind: str) -> None:
        """From another thread: queue a signal for the agent thread and end its wait."""
        self._inbox.put((kind, None))
        self.bus.wake()

    def _send(self, events: list[WorkerEvent], hold: bool = False) -> None:
        """Queue events; send everything queued unless another thread is sending already.

        With `hold`, the events may wait up to BATCH_WINDOW for more (the agent thread
        sends them then). Results are journaled once handed to the bus (queued there while
        the broker is away): a crash in between runs the job again after the restart, as a
        crash during the job would. A batch that cannot be published is not retried here:
        results are re-sent on reconnect, or when they look lost, and the scheduler asks
        again for jobs it heard nothing about.
        """
        with self._outbox_lock:
            self._outbox += events
            if hold:
                if self._flush_at is None:
                    self._flush_at = time.monotonic() + BATCH_WINDOW
                    self._tell("wake")  # the agent sleeps until then
                return
            if self._sending or not self._outbox:
                return
            self._sending = True
        while True:
            with self._outbox_lock:
                batch, self._outbox = self._outbox, []
                self._flush_at = None
                if not batch:
                    self._sending = False
                    return
            try:
                self.bus.publish_many(topics.events(self.name), batch)
            except Exception:
                log.exception("worker %s: %d events not published", self.name, len(batch))
            finals = [e for e in batch if isinstance(e, JobFinished | JobFailed)]
            try:
                if finals:
                    with self.journal.transaction():
                        for final in finals:
                            self.journal.finish(final)
            except Exception:
                log.exception("worker %s: %d results not journaled", self.name, len(finals))

    def _handle(self, kind: str, item: Any) -> None:
        if kind == "message":
            self._receive(*item)
        elif kind == "events":
            self._outgoing += item
        elif kind == "connected":
            self._resend(older_than=0.0)  # its presence goes out after the burst

    def _arrived(self, topic: str, payload: bytes) -> None:
        """A bus callback, on the agent thread inside `pump()`. Jobs are decoded,
        deduplicated and journaled here (nothing here waits on the bus), and handed to the
        runners when the pump returns; anything else, and the replies to repeated jobs, is
        queued for the next burst.
        """
        if topic != self._jobs_topic:
            self._inbox.put(("message", (topic, payload)))
            return
        message = self._decode(topic, payload)
        if message is None:
            return
        taken: list[_Attempt] = []
        try:
            with self.journal.transaction():
                replies = [
                    reply
                    for job in unbatch(message)
                    if (reply := self._job_ready(job, taken)) is not None
                ]
        except Exception:
            log.exception("worker %s: jobs not taken", self.name)  # the scheduler re-sends
            with self._lock:  # forgotten, so that the re-sent jobs are taken afresh
                for attempt in taken:
                    key = (attempt.job.artifact_id, attempt.job.job_id)
                    if self._attempts.get(key) is attempt:
                        del self._attempts[key]
            return
        # Handed over after the pump: a runner woken earlier would wait for the journal,
        # then for the socket, to send its result.
        self._taken += taken
        if replies:
            self._inbox.put(("events", replies))

    def _decode(self, topic: str, payload: bytes) -> Any:
        try:
            _, message = decode(topic, payload)
        except ProtocolError as exc:
            log.error("worker %s rejected a message: %s", self.name, exc)
            return None
        self._heard = time.monotonic()
        return message

    def _receive(self, topic: str, payload: bytes) -> None:
        message = self._decode(topic, payload)
        if message is None:
            return
        if isinstance(message, EventAck):
            self.journal.forget(message.jobs)
            with self._lock:
                for ref in message.jobs:
                    attempt = self._attempts.get((ref.artifact_id, ref.job_id))
                    if attempt is not None and attempt.job.attempt == ref.attempt:
                        del self._attempts[(ref.artifact_id, ref.job_id)]
                        self._answered = max(self._answered, attempt.first_sent)
        elif isinstance(message, CancelJob):
            ref = message.job
            with self._lock:
                attempt = self._attempts.get((ref.artifact_id, ref.job_id))
            if attempt is not None and attempt.job.attempt == ref.attempt:
                attempt.cancelled.set()
        else:
            log.error("worker %s: unexpected %s on %s", self.name, type(message).__name__, topic)

    def _job_ready(self, job: JobReady, taken: list[_Attempt]) -> WorkerEvent | None:
        """Take a job (once per attempt, journaled and added to `taken` for the runners);
        the reply to a repeated one, if any."""
        key = (job.artifact_id, job.job_id)
        reply: Final | JobAccepted | None = None
        with self._lock:
            known = self._attempts.get(key)
            if known is not None and known.job.attempt > job.attempt:
                return None  # a stale re-send of an attempt already replaced
            if known is not None and known.job.attempt == job.attempt:
                # A duplicate: repeat what we said, so a lost reply is recovered.
                reply = known.final or JobAccepted(job=job.ref)
                fresh = None
            else:
                if known is not None:
                    known.cancelled.set()  # an older attempt nobody waits for any more
                # Queued or not, a new job gets no reply of its own: its result (or its
                # announcement, if it runs long) tells the scheduler it arrived.
                fresh = self._attempts[key] = _Attempt(job)
        if fresh is not None:
            taken.append(fresh)  # first: forgotten again if the journal fails
            self.journal.hold(job)
        return reply

    def _submit(self, attempt: _Attempt) -> None:
        with self._lock:
            self._queued += 1
        self._jobs.put(attempt)

    def _runner(self) -> None:
        while (attempt := self._jobs.get()) is not None:
            try:
                self._run(attempt)
            except Exception:  # a runner outlives any job
                log.exception("worker %s: runner error", self.name)

    def _heartbeat(self) -> None:
        with self._lock:
            running = [a.job.ref for a in self._attempts.values() if a.running]
        if running:
            self._outgoing.append(JobHeartbeat(jobs=running, at=time.time()))

    def _resend(self, older_than: float) -> None:
        """Publish again the results not acknowledged within `older_than` seconds.

        A periodic re-send is for a result that looks lost: the scheduler acknowledged a
        result published after it (it handles them in order), or said nothing at all for
        `older_than`; a scheduler busy with a backlog is not flooded with copies. Each
        periodic re-send of a result waits twice as long as the one before (up to
        MAX_BACKOFF times `older_than`). A reconnect (`older_than` 0) re-sends them all.
        """
        now = time.monotonic()
        silent = now - self._heard >= older_than
        pending = []
        with self._lock:
            for attempt in self._attempts.values():
                wait = older_than * min(MAX_BACKOFF, 2**attempt.resends)
                lost = silent or self._answered > attempt.first_sent
                if older_than > 0 and not lost:
                    continue
                if attempt.final is not None and now - attempt.sent_at >= wait:
                    attempt.sent_at = now
                    if older_than > 0:
                        attempt.resends += 1
                    pending.append(attempt.final)
        self._outgoing.extend(pending)

    def _announce(self, attempt: _Attempt) -> None:
        """Publish JobStarted for an attempt still running STARTED_AFTER after it started."""
        with self._lock:
            if not attempt.running or attempt.announced or attempt.cancelled.is_set():
                return
            attempt.announced = True
        self._outgoing.append(JobStarted(job=attempt.job.ref, at=attempt.started_at))

    # --- job runners -------------------------------------------------------------------

    def _run(self, attempt: _Attempt) -> None:
        job = attempt.job
        ids = {"artifact_id": job.artifact_id, "job_id": job.job_id, "attempt": job.attempt}
        with log_context(**ids, worker=self.name):
            self._run_attempt(attempt)

    def _run_attempt(self, attempt: _Attempt) -> None:
        job = attempt.job
        final: Final | None = None
        try:
            if attempt.cancelled.is_set():
                return
            started = time.time()
            with self._lock:
                attempt.running, attempt.started_at, attempt.announced = True, started, False
            # Announced by the agent thread if it is still running STARTED_AFTER from now;
            # wake the agent only if it sleeps past then (an idle worker's first job).
            announce_at = time.monotonic() + STARTED_AFTER
            self._starting.append((announce_at, attempt))
            if self._wakes_at > announce_at + STARTED_AFTER:
                self._tell("wake")
            final = self._execute(attempt, started)
        except Exception:
            log.exception("worker %s: job %s/%s not run", self.name, job.artifact_id, job.job_id)
        finally:
            with self._lock:
                attempt.running = False
                self._queued -= 1
                waiting = self._queued >= self.config.max_jobs  # jobs queued behind it
                if final is not None and not attempt.cancelled.is_set():
                    attempt.final = final
                    attempt.sent_at = attempt.first_sent = time.monotonic()
                else:
                    final = None  # cancelled or superseded while running: nobody wants it
        if final is not None:
            self._send([final], hold=waiting)

    def _execute(self, attempt: _Attempt, started: float) -> Final:
        job = attempt.job
        exit_code: int | None = None
        try:
            if job.kind == "tasks":
                product = self.tasks.run(job, self.name, attempt.cancelled)
                exit_code = product["exit_code"]
            else:
                inputs = [json.loads(self.store.get(resource)) for resource in job.inputs]
                context = operations.JobContext(
                    job=job,
                    node=self.name,
                    inputs=inputs,
                    data=self._datasets.get(job.project),
                    cancelled=attempt.cancelled,
                )
                product = operations.run(context)
            data = _PRODUCT_JSON.encode(product).encode()
            resource = self.store.put_product(job.artifact_id, str(job.job_id), job.attempt, data)
        except Exception as exc:
            return JobFailed(
                job=job.ref,
                error=RemoteError(
                    type=type(exc).__name__, message=str(exc), traceback=traceback.format_exc()
                ),
                started_at=started,
                finished_at=time.time(),
                exit_code=exc.exit_code if isinstance(exc, TaskError) else None,
            )
        return JobFinished(
            job=job.ref,
            product=resource,
            started_at=started,
            finished_at=time.time(),
            exit_code=exit_code,
        )
