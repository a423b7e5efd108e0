"""The edge worker agent: receives jobs on its own topic, runs them next to its data.

Threads: paho's network thread only enqueues; the agent thread decodes, deduplicates and
hands jobs to a pool of `max_jobs` runners; runners publish their events. A finished or
failed event is journaled, then published, and re-sent on every reconnect and every
`resend_interval` until the scheduler acknowledges it, so a result survives a lost
connection and a restart of the worker.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
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
    decode,
    topics,
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
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._attempts: dict[JobKey, _Attempt] = {}
        self._queued = 0  # jobs handed to the pool and not yet done
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(config.max_jobs, thread_name_prefix=f"job-{self.name}")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"worker-{self.name}", daemon=True)
        self.bus = Bus(
            client_id=self.name,
            config=config.broker.bus_config(),
            on_message=lambda topic, payload: self._inbox.put(("message", (topic, payload))),
            subscriptions=[topics.worker_inbox(self.name)],
            will=Will(topics.presence(self.name), self.presence(online=False)),
            on_connect=lambda session: self._inbox.put(("connected", session)),
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
        self._thread.start()
        self.bus.start(wait=wait)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)
        with self._lock:
            for attempt in self._attempts.values():
                attempt.cancelled.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(self._python, PythonExecutor):
            self._python.close()
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
        while not self._stopping.is_set():
            wait = max(0.0, min(resend_at, beat_at) - time.monotonic())
            try:
                kind, item = self._inbox.get(timeout=wait)
            except queue.Empty:
                kind, item = "tick", None
            try:
                if kind == "message":
                    self._receive(*item)
                elif kind == "connected":
                    self.bus.publish(
                        topics.presence(self.name), self.presence(online=True), retain=True
                    )
                    self._resend(older_than=0.0)
                now = time.monotonic()
                if now >= beat_at:
                    self._heartbeat()
                    beat_at = now + self.config.heartbeat_interval
                if now >= resend_at:
                    self._resend(older_than=self.config.resend_interval)
                    resend_at = now + self.config.resend_interval
            except Exception:
                log.exception("worker %s: error handling %s", self.name, kind)

    def _receive(self, topic: str, payload: bytes) -> None:
        try:
            _, message = decode(topic, payload)
        except ProtocolError as exc:
            log.error("worker %s rejected a message: %s", self.name, exc)
            return
        if isinstance(message, JobReady):
            self._job_ready(message)
        elif isinstance(message, EventAck):
            self.journal.forget(message.jobs)
            with self._lock:
                for ref in message.jobs:
                    attempt = self._attempts.get((ref.artifact_id, ref.job_id))
                    if attempt is not None and attempt.job.attempt == ref.attempt:
                        del self._attempts[(ref.artifact_id, ref.job_id)]
        elif isinstance(message, CancelJob):
            ref = message.job
            with self._lock:
                attempt = self._attempts.get((ref.artifact_id, ref.job_id))
            if attempt is not None and attempt.job.attempt == ref.attempt:
                attempt.cancelled.set()
        else:
            log.error("worker %s: unexpected %s on %s", self.name, type(message).__name__, topic)

    def _job_ready(self, job: JobReady) -> None:
        key = (job.artifact_id, job.job_id)
        reply: Final | JobAccepted | None = None
        with self._lock:
            known = self._attempts.get(key)
            if known is not None and known.job.attempt > job.attempt:
                return  # a stale re-send of an attempt already replaced
            if known is not None and known.job.attempt == job.attempt:
                # A duplicate: repeat what we said, so a lost reply is recovered.
                reply = known.final or JobAccepted(job=job.ref)
                fresh = None
            else:
                if known is not None:
                    known.cancelled.set()  # an older attempt nobody waits for any more
                fresh = self._attempts[key] = _Attempt(job)
                if self._queued >= self.config.max_jobs:
                    reply = JobAccepted(job=job.ref)  # queued: stop the scheduler re-sending
        if fresh is not None:
            self.journal.hold(job)
            self._submit(fresh)
        if reply is not None:
            self.bus.publish(topics.events(self.name), reply)

    def _submit(self, attempt: _Attempt) -> None:
        with self._lock:
            self._queued += 1
        self._pool.submit(self._run, attempt)

    def _heartbeat(self) -> None:
        with self._lock:
            running = [a.job.ref for a in self._attempts.values() if a.running]
        if running:
            self.bus.publish(topics.events(self.name), JobHeartbeat(jobs=running, at=time.time()))

    def _resend(self, older_than: float) -> None:
        """Publish again the results not acknowledged within `older_than` seconds.

        Each periodic re-send of a result waits twice as long as the one before (up to
        MAX_BACKOFF times `older_than`): a scheduler slow to acknowledge because it is busy
        is not flooded with copies. A reconnect (`older_than` 0) re-sends them all at once.
        """
        now = time.monotonic()
        pending = []
        with self._lock:
            for attempt in self._attempts.values():
                wait = older_than * min(MAX_BACKOFF, 2**attempt.resends)
                if attempt.final is not None and now - attempt.sent_at >= wait:
                    attempt.sent_at = now
                    if older_than > 0:
                        attempt.resends += 1
                    pending.append(attempt.final)
        for event in pending:
            self.bus.publish(topics.events(self.name), event)

    # --- job runners -------------------------------------------------------------------

    def _run(self, attempt: _Attempt) -> None:
        job = attempt.job
        ids = {"artifact_id": job.artifact_id, "job_id": job.job_id, "attempt": job.attempt}
        with log_context(**ids, worker=self.name):
            self._run_attempt(attempt)

    def _run_attempt(self, attempt: _Attempt) -> None:
        job = attempt.job
        try:
            if attempt.cancelled.is_set():
                return
            started = time.time()
            with self._lock:
                attempt.running = True
            self.bus.publish(topics.events(self.name), JobStarted(job=job.ref, at=started))
            final = self._execute(attempt, started)
            with self._lock:
                attempt.running = False
                if attempt.cancelled.is_set():
                    return  # cancelled or superseded while running: nobody wants this result
                attempt.final = final
                attempt.sent_at = time.monotonic()
            self.journal.finish(final)
            self.bus.publish(topics.events(self.name), final)
        except Exception:  # a bus failure: the scheduler re-sends the job
            log.exception("worker %s: job %s/%s not run", self.name, job.artifact_id, job.job_id)
        finally:
            with self._lock:
                attempt.running = False
                self._queued -= 1

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
            data = json.dumps(product, allow_nan=False).encode()
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
