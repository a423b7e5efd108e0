"""The edge worker agent: receives jobs on its own topic, runs them next to its data.

Threads: paho's network thread only enqueues; the agent thread decodes, deduplicates and
hands jobs to a pool of `max_jobs` runners; runners publish their events. A finished or
failed event stays in the outbox until the scheduler acknowledges it, and is re-sent on
every reconnect and every `resend_interval`, so a result survives a lost connection.
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

from flotta_mqtt.model import SafeId
from flotta_mqtt.protocol import (
    CancelJob,
    EventAck,
    JobAccepted,
    JobFailed,
    JobFinished,
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
from flotta_mqtt.transport.bus import Bus, Will
from flotta_mqtt.transport.store import ResourceStore

log = logging.getLogger(__name__)

JobKey = tuple[str, int]  # (artifact id, job id)


class WorkerConfig(BaseModel):
    """A worker's settings, from a YAML file, flags or FLOTTA_* variables."""

    model_config = ConfigDict(extra="forbid")

    name: SafeId
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    datasets: dict[SafeId, list[Path]] = Field(default_factory=dict)  # project → CSV files
    labels: dict[str, str] = Field(default_factory=dict)
    max_jobs: int = Field(default=2, ge=1, le=1024)
    plugins: list[str] = Field(default_factory=list)  # modules registering more operations
    resend_interval: float = Field(default=5.0, gt=0)
    initiator: bool = False  # the scheduler's own runner: holds no data


@dataclass
class _Attempt:
    job: JobReady
    cancelled: bool = False
    final: JobFinished | JobFailed | None = None


@dataclass
class _State:
    attempts: dict[JobKey, _Attempt] = field(default_factory=dict)
    outbox: dict[JobKey, JobFinished | JobFailed] = field(default_factory=dict)
    running: int = 0


class WorkerAgent:
    """One worker node. `start()` connects and serves; `stop()` says goodbye."""

    def __init__(self, config: WorkerConfig) -> None:
        operations.load_plugins(config.plugins)
        self.config = config
        self.name = config.name
        self.store = ResourceStore(config.storage.url, config.storage.options)
        self._datasets = {
            project: operations.CsvDataset(project, config.name, paths)
            for project, paths in config.datasets.items()
        }
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._state = _State()
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
            labels=self.config.labels,
            operations=sorted(operations.REGISTRY),
            max_jobs=self.config.max_jobs,
            details={
                project: {"columns": list(dataset.columns())}
                for project, dataset in self._datasets.items()
            },
            since=time.time(),
        )

    def start(self, wait: float | None = 10.0) -> WorkerAgent:
        self._thread.start()
        self.bus.start(wait=wait)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.bus.stop(goodbye=[(topics.presence(self.name), self.presence(online=False), True)])

    # --- agent thread ----------------------------------------------------------------

    def _serve(self) -> None:
        next_resend = time.monotonic() + self.config.resend_interval
        while not self._stopping.is_set():
            try:
                kind, item = self._inbox.get(timeout=max(0.0, next_resend - time.monotonic()))
            except queue.Empty:
                kind, item = "resend", None
            try:
                if kind == "message":
                    self._receive(*item)
                elif kind == "connected":
                    self.bus.publish(
                        topics.presence(self.name), self.presence(online=True), retain=True
                    )
                    self._resend()
                elif kind == "resend":
                    self._resend()
                    next_resend = time.monotonic() + self.config.resend_interval
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
            with self._lock:
                for ref in message.jobs:
                    final = self._state.outbox.get((ref.artifact_id, ref.job_id))
                    if final is not None and final.job.attempt == ref.attempt:
                        del self._state.outbox[(ref.artifact_id, ref.job_id)]
        elif isinstance(message, CancelJob):
            with self._lock:
                attempt = self._state.attempts.get((message.job.artifact_id, message.job.job_id))
                if attempt is not None and attempt.job.attempt == message.job.attempt:
                    attempt.cancelled = True
        else:
            log.error("worker %s: unexpected %s on %s", self.name, type(message).__name__, topic)

    def _job_ready(self, job: JobReady) -> None:
        key = (job.artifact_id, job.job_id)
        reply: JobFinished | JobFailed | JobAccepted | None = None
        with self._lock:
            known = self._state.attempts.get(key)
            if known is not None and known.job.attempt > job.attempt:
                return  # a stale re-send of an attempt already replaced
            fresh = known is None or known.job.attempt < job.attempt
            if fresh:
                self._state.attempts[key] = _Attempt(job)
                if self._state.running >= self.config.max_jobs:
                    reply = JobAccepted(job=job.ref)  # queued: stop the scheduler re-sending
                self._state.running += 1
            else:
                # A duplicate: repeat what we said, so a lost reply is recovered.
                assert known is not None
                reply = known.final or JobAccepted(job=job.ref)
        if reply is not None:
            self.bus.publish(topics.events(self.name), reply)
        if fresh:
            self._pool.submit(self._run, job)

    def _resend(self) -> None:
        with self._lock:
            pending = list(self._state.outbox.values())
        for event in pending:
            self.bus.publish(topics.events(self.name), event)

    # --- job runners -------------------------------------------------------------------

    def _run(self, job: JobReady) -> None:
        key = (job.artifact_id, job.job_id)
        started = time.time()
        try:
            with self._lock:
                attempt = self._state.attempts[key]
                skip = attempt.cancelled or attempt.job.attempt != job.attempt
            if skip:
                return
            self.bus.publish(topics.events(self.name), JobStarted(job=job.ref, at=started))
            final: JobFinished | JobFailed = self._execute(job, started)
        except Exception as exc:  # a bus failure: the scheduler will re-send the job
            log.exception("worker %s: job %s/%s not run: %s", self.name, *key, exc)
            return
        finally:
            with self._lock:
                self._state.running -= 1
        with self._lock:
            current = self._state.attempts.get(key)
            if current is None or current.job.attempt != job.attempt or current.cancelled:
                return  # superseded or cancelled while running: nobody wants this result
            current.final = final
            self._state.outbox[key] = final
        self.bus.publish(topics.events(self.name), final)

    def _execute(self, job: JobReady, started: float) -> JobFinished | JobFailed:
        try:
            inputs = [json.loads(self.store.get(resource)) for resource in job.inputs]
            context = operations.JobContext(
                job=job,
                node=self.name,
                inputs=inputs,
                data=self._datasets.get(job.project),
            )
            product = operations.run(context)
            data = json.dumps(product, allow_nan=False).encode()
            resource = self.store.put_product(job.artifact_id, str(job.job_id), job.attempt, data)
        except Exception as exc:
            return JobFailed(
                job=job.ref,
                error=RemoteError(
                    type=type(exc).__name__,
                    message=str(exc),
                    traceback=traceback.format_exc(),
                ),
                finished_at=time.time(),
            )
        return JobFinished(
            job=job.ref, product=resource, started_at=started, finished_at=time.time()
        )
