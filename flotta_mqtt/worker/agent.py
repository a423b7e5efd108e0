"""The edge worker agent: receives jobs on its own topic, runs them next to its data.

Threads: `max_jobs + 1` of them, each in turn the agent or a runner. The agent drives
the bus (an unthreaded Bus: it reads the socket itself). New jobs are taken as they are
read (decoded and deduplicated), then journaled, acknowledged and handed to the runners;
everything else is queued and handled in bursts: what is queued is taken (never waiting
for more), handled inside one journal transaction, committed, then the events the burst
produced are sent. Runners run jobs in order and send their results themselves, writing
them to the socket at once. Events go out in batches through one outbox: whichever
thread finds nothing being sent sends what is waiting, so a lone result leaves at once
from its runner and results that pile up meanwhile leave together.

An idle worker's agent runs a lone new job itself: waking a runner first costs a
wake-up and a fight for the GIL (about 0.1 ms a job here, the longest step of a chain's
hop through a worker). An idle thread stands by meanwhile, and takes the agent's turn
if the job still runs STARTED_AFTER after it started (and announces it): a long job
delays the worker's other messages by that much at most. The lone job is journaled
with its result, in one transaction after it ran, or by the thread taking the agent's
turn; until then the bus acknowledges nothing, so a worker that dies first gets the job
again from the broker (and runs it again, as it would a journaled job cut off).

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

from flotta_mqtt import analytics as operations
from flotta_mqtt.functions.executor import PythonExecutor
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
from flotta_mqtt.transport import Will
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker.journal import Final, Journal
from flotta_mqtt.workflows.executors import TaskError, TaskRunner

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
        self._taken: list[_Attempt] = []  # jobs read, to be journaled and taken
        # A lone job the agent took without journaling it (see _take), until _journal.
        self._unjournaled: _Attempt | None = None
        self._outbox: list[WorkerEvent] = []  # events waiting to be sent
        self._sending = False  # a thread is sending the outbox
        self._flush_at: float | None = None  # when results held for a batch must go
        self._outbox_lock = threading.Lock()
        # Attempts that started, by when to announce them: runners append, the agent pops.
        self._starting: deque[tuple[float, _Attempt]] = deque()
        self._wakes_at = 0.0  # monotonic time the agent wakes at the latest
        self._attempts: dict[JobKey, _Attempt] = {}
        # When the scheduler last said anything, and the latest first publish of a result
        # it acknowledged (monotonic): what tells a lost result from a busy scheduler.
        self._heard = time.monotonic()
        self._answered = 0.0
        self._lock = threading.Lock()
        # Who does what (see _work): jobs waiting for a runner, in order, how many run,
        # the thread whose turn it is to be the agent, when it started running a job
        # itself (monotonic), and the idle thread standing by meanwhile.
        self._turns = threading.Condition()
        self._ready: deque[_Attempt] = deque()
        self._running = 0
        self._agent: threading.Thread | None = None
        self._agent_busy_since: float | None = None
        self._standby: threading.Thread | None = None
        self._threads = [
            threading.Thread(target=self._work, name=f"worker-{self.name}-{i}", daemon=True)
            for i in range(config.max_jobs + 1)
        ]
        # The agent's timers (monotonic), carried from one agent's turn to the next.
        self._resend_at = self._beat_at = 0.0
        self._checked_at = 0.0  # when started jobs were last looked at
        self._stopping = threading.Event()
        self.bus = Bus(
            client_id=self.name,
            config=config.broker.bus_config(),
            on_message=self._arrived,
            subscriptions=[topics.worker_inbox(self.name)],
            will=Will(topics.presence(self.name), self.presence(online=False)),
            on_connect=lambda session: self._inbox.put(("connected", session)),
            threaded=False,  # driven by whichever thread is the agent; runners write results
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
        self._resume()
        self._resend_at = time.monotonic() + self.config.resend_interval
        self._beat_at = time.monotonic() + self.config.heartbeat_interval
        for thread in self._threads:
            thread.start()
        self.bus.start(wait=wait)
        return self

    def stop(self) -> None:
        """Cancel the jobs (those cut off run again after a restart: they are journaled),
        then say goodbye."""
        self._stopping.set()
        self._tell("stop")
        with self._turns:
            self._turns.notify_all()  # idle threads leave; nobody takes the agent's turn
            # The agent leaves its loop, or runs a job (and leaves after it).
            if not self._turns.wait_for(
                lambda: self._agent is None or self._agent_busy_since is not None, timeout=10
            ):
                log.error("worker %s: the agent did not stop", self.name)
        with self._lock:
            for attempt in self._attempts.values():
                attempt.cancelled.set()
        self._journal([])  # a lone job cut off: journaled, so it runs again after a restart
        self.bus.pump(0)  # this thread drives the bus from now on: goodbye, last results
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
                self._ready.append(attempt)

    # --- the worker's threads -----------------------------------------------------------

    def _work(self) -> None:
        """Each thread: run the next job while fewer than `max_jobs` run, else take the
        agent's turn if nobody has it, else wait (standing by while the agent runs a job);
        leave when the worker stops."""
        me = threading.current_thread()
        while True:
            with self._turns:
                work = self._next(me)
            if isinstance(work, _Attempt):
                self._run_job(work)
            elif work is None or not self._agent_turn(me):
                return

    def _agent_turn(self, me: threading.Thread) -> bool:
        """Serve as the agent, running lone jobs in between, until another thread takes
        the turn over (True) or the worker stops (False)."""
        while (job := self._serve()) is not None:
            self._run_job(job)
            with self._turns:
                if self._agent is not me:  # taken over while the job ran
                    return True
                self._agent_busy_since = None
        return False

    def _run_job(self, attempt: _Attempt) -> None:
        try:
            self._run(attempt)
        except Exception:  # a thread outlives any job
            log.exception("worker %s: runner error", self.name)
        finally:
            with self._turns:
                self._running -= 1

    def _next(self, me: threading.Thread) -> _Attempt | threading.Thread | None:
        """Under `_turns`: wait for what `me` does next, a job to run or the agent's turn
        (`me`), or None when the worker stops."""
        while not self._stopping.is_set():
            taken: _Attempt | threading.Thread | None = None
            late: float | None = None  # standing by: how long until `me` takes over
            if self._ready and self._running < self.config.max_jobs:
                taken = self._ready.popleft()
                self._running += 1
            elif self._agent is None:
                taken = self._agent = me
            elif self._standby in (None, me) and self._agent_busy_since is not None:
                self._standby = me
                late = self._agent_busy_since + STARTED_AFTER - time.monotonic()
                if late <= 0:  # a long job: its runner is no agent any more
                    taken = self._agent = me
                    self._agent_busy_since = None
            if self._standby is me and (taken is not None or late is None):
                self._standby = None  # off to work, or the agent's job is over
            if taken is not None:
                return taken
            self._turns.wait(late)
        return None

    def _take(self, taken: list[_Attempt]) -> _Attempt | None:
        """Journal jobs read and queue them for the runners; or, if the worker is idle,
        return a lone one for the agent to run at once, unjournaled and unacknowledged
        (see the module's docstring)."""
        with self._turns:
            if len(taken) == 1 and self._running == 0 and not self._ready:
                self._running += 1
                self._agent_busy_since = time.monotonic()
                if self._standby is None:
                    self._turns.notify()  # an idle thread stands by
                self.bus.withhold(True)
                with self._lock:
                    self._unjournaled = taken[0]
                return taken[0]
        try:
            with self.journal.transaction():
                for attempt in taken:
                    self.journal.hold(attempt.job)
        except Exception:
            log.exception("worker %s: jobs not taken", self.name)  # the scheduler re-sends
            with self._lock:  # forgotten, so that the re-sent jobs are taken afresh
                for attempt in taken:
                    key = (attempt.job.artifact_id, attempt.job.job_id)
                    if self._attempts.get(key) is attempt:
                        del self._attempts[key]
            return None
        # Acknowledged before a runner starts on one (the write would compete with it).
        self.bus.acknowledge()
        with self._turns:
            self._ready.extend(taken)
            self._turns.notify(min(len(self._ready), self.config.max_jobs - self._running))
        return None

    def _journal(self, finals: list[Final]) -> None:
        """Journal results in one transaction, after the lone job taken unjournaled, if
        any; that job's JobReady may then be acknowledged.

        Whoever journals the lone job (its runner with its result, the thread taking the
        agent's turn, `stop()`) takes it inside the transaction: a result's update comes
        after the job's row is committed. Were the write to fail, the job is acknowledged
        anyway, as jobs whose journal write fails are: the scheduler re-sends what it
        hears nothing about.
        """
        if not finals and self._unjournaled is None:
            return  # nothing to write: no transaction
        lone = None
        try:
            with self.journal.transaction():
                with self._lock:
                    lone, self._unjournaled = self._unjournaled, None
                if lone is not None:
                    self.journal.hold(lone.job)
                for final in finals:
                    self.journal.finish(final)
        except Exception:
            job = "" if lone is None else f" and job {lone.job.artifact_id}/{lone.job.job_id}"
            log.exception("worker %s: %d results%s not journaled", self.name, len(finals), job)
        finally:
            if lone is not None:
                self.bus.withhold(False)

    def _serve(self) -> _Attempt | None:
        """The agent's turn: serve until taking a lone job to run itself (returned) or
        stopping."""
        while not self._stopping.is_set():
            # A lone job still unjournaled (taken over, or it had no result) is journaled
            # before pumping: a long job holds no acknowledgements back.
            self._journal([])
            due = self._wakes_at = min(
                self._resend_at, self._beat_at, self._flush_at or self._resend_at
            )
            # Said before looking: a runner adding a job after the look sees a long sleep.
            if self._starting:
                due = min(due, max(self._starting[0][0], self._checked_at + STARTED_AFTER))
                self._wakes_at = due
            if self._inbox.empty():  # read the socket, waiting until `due` at most
                self.bus.pump(max(0.0, due - time.monotonic()))
            self._wakes_at = 0.0  # awake: a job starting now is seen before the next sleep
            with self._lock:
                taken, self._taken = self._taken, []
            if taken and (lone := self._take(taken)) is not None:
                return lone  # what else was read is handled after it
            self.bus.acknowledge()
            burst: list[tuple[str, Any]] = []
            try:
                while len(burst) < BURST:
                    burst.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            # A wake for timers alone writes nothing: no transaction.
            with self.journal.transaction() if burst else contextlib.nullcontext():
                for kind, item in burst:
                    try:
                        self._handle(kind, item)
                    except Exception:
                        log.exception("worker %s: error handling %s", self.name, kind)
            now = time.monotonic()
            if self._starting and self._starting[0][0] <= now:
                self._checked_at = now
                while self._starting and self._starting[0][0] <= now:
                    self._announce(self._starting.popleft()[1])
            if now >= self._beat_at:
                self._heartbeat()
                self._beat_at = now + self.config.heartbeat_interval
            if now >= self._resend_at:
                self._resend(older_than=self.config.resend_interval)
                self._resend_at = now + self.config.resend_interval
            # Publishing may wait for room in the window, pumping the bus meanwhile: publish
            # after the commit, with no transaction open.
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
        with self._turns:
            self._agent = None
            self._turns.notify_all()  # stop() waits for the agent to leave
        return None

    def _tell(self, kind: str) -> None:
        """From another thread: queue a signal for the agent thread and end its wait."""
        self._inbox.put((kind, None))
        self.bus.wake()

    def _send(self, events: list[WorkerEvent], hold: bool = False) -> None:
        """Queue events; send everything queued unless another thread is sending already.

        With `hold`, the events may wait up to BATCH_WINDOW for more (the agent thread
        sends them then). Results are journaled once handed to the bus (queued there while
        the broker is away): a crash in between runs the job again after the restart, as a
        crash during the job would (a lone job unjournaled is delivered again). A batch
        that cannot be published is not retried here: results are re-sent on reconnect, or
        when they look lost, and the scheduler asks again for jobs it heard nothing about.
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
            self._journal([e for e in batch if isinstance(e, JobFinished | JobFailed)])

    def _handle(self, kind: str, item: Any) -> None:
        if kind == "message":
            self._receive(*item)
        elif kind == "events":
            self._outgoing += item
        elif kind == "connected":
            self._resend(older_than=0.0)  # its presence goes out after the burst

    def _arrived(self, topic: str, payload: bytes) -> None:
        """A bus callback, on the agent thread inside `pump()`. Jobs are decoded and
        deduplicated here, and taken (`_take`: journaled for the runners, or a lone one
        run by the agent) when the pump returns; anything else, and the replies to
        repeated jobs, is queued for the next burst.
        """
        if topic != self._jobs_topic:
            self._inbox.put(("message", (topic, payload)))
            return
        message = self._decode(topic, payload)
        if message is None:
            return
        taken: list[_Attempt] = []
        replies = [
            reply for job in unbatch(message) if (reply := self._job_ready(job, taken)) is not None
        ]
        # Handed over after the pump: a runner woken earlier would wait for the socket to
        # send its result.
        with self._lock:
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
        """Take a job (once per attempt, added to `taken`); the reply to a repeated one,
        if any."""
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
            taken.append(fresh)
        return reply

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
            with self._turns:
                waiting = bool(self._ready)  # jobs queued behind it
            with self._lock:
                attempt.running = False
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
