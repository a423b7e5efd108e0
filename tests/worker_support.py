"""A worker on the in-memory transport, with a stand-in scheduler, for the worker's unit tests.

`Station` holds a fresh `memory://` broker, a bus in the scheduler's place that records
the worker's events and sends it jobs, acknowledgements and cancels, and the workers it
started (stopped at the end). `gated` jobs run the `worker_test_gate` operation: each
waits for its gate to open (or for its cancel) and reports its runs to `Gates`, which a
test waits on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from helpers import MessageRecorder, job_ready, messages_of
from pydantic import BaseModel, ConfigDict

from flotta_mqtt.analytics import REGISTRY, JobContext, OperationDef, OperationError, register
from flotta_mqtt.model import Operation
from flotta_mqtt.protocol import (
    CancelJob,
    EventAck,
    JobBatch,
    JobFailed,
    JobFinished,
    JobReady,
    JobRef,
    topics,
)
from flotta_mqtt.transport.memory import MemoryBus, fresh_memory_broker
from flotta_mqtt.transport.settings import StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

TIMEOUT = 10.0
GATE = "worker_test_gate"


class Gates:
    """The gate jobs' runs: who runs now, the most at once, each run's end."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.open: set[str] = set()
        self.running: set[tuple[str, int]] = set()  # (gate, attempt)
        self.runs: list[tuple[str, int]] = []
        self.cancelled: list[tuple[str, int]] = []
        self.most = 0  # the most runs at once

    def release(self, *names: str) -> None:
        with self.changed:
            self.open.update(names)
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], object], message: str) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, TIMEOUT), message

    def pass_through(self, name: str, attempt: int, cancelled: threading.Event) -> None:
        """A run: wait for the gate `name` to open, or for the cancel."""
        run = (name, attempt)
        with self.changed:
            self.runs.append(run)
            self.running.add(run)
            self.most = max(self.most, len(self.running))
            self.changed.notify_all()
        try:
            while True:
                with self.changed:
                    if self.changed.wait_for(lambda: name in self.open, 0.005):
                        return
                if cancelled.is_set():
                    with self.changed:
                        self.cancelled.append(run)
                    raise OperationError("cancelled")
        finally:
            with self.changed:
                self.running.discard(run)
                self.changed.notify_all()


GATES = Gates()


class GateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gate: str


class Gate(OperationDef):
    name: ClassVar[str] = GATE
    Params = GateParams

    def local(self, params: GateParams, ctx: JobContext) -> Any:
        GATES.pass_through(params.gate, ctx.job.attempt, ctx.cancelled)
        return params.gate


if GATE not in REGISTRY:
    register(Gate)


def gated(job_id: int, gate: str | None = None, attempt: int = 1) -> JobReady:
    """A job that waits for its gate (by default named after the job) to open."""
    params = {"gate": gate or f"job-{job_id}"}
    return job_ready(job_id, attempt=attempt, operation=Operation(name=GATE, params=params))


def results(messages: list[tuple[str, bytes]], job_id: int) -> list[JobFinished | JobFailed]:
    """The results published for one job, in order (copies included)."""
    kinds = (JobFinished, JobFailed)
    return [m for m in messages_of(messages, kinds) if m.job.job_id == job_id]  # type: ignore[arg-type]


class Station:
    """A memory broker, a stand-in scheduler on it, and the workers started there."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.broker = fresh_memory_broker("worker")
        self.events = MessageRecorder()
        self.scheduler = MemoryBus(
            "scheduler",
            self.broker.broker_settings(),
            self.events,
            [topics.ALL_EVENTS],
            threaded=True,
        ).start()
        self.workers: list[WorkerAgent] = []

    def config(self, name: str = "w0", **settings: Any) -> WorkerConfig:
        fields: dict[str, Any] = {
            "name": name,
            "broker": self.broker.broker_settings(),
            "storage": StorageSettings(url=(self.tmp_path / "store").as_uri()),
            "state_dir": self.tmp_path / f"{name}-state",
            "resend_interval": 3600.0,  # no periodic re-send unless a test asks for one
            **settings,
        }
        return WorkerConfig(**fields)

    def worker(self, name: str = "w0", **settings: Any) -> WorkerAgent:
        agent = WorkerAgent(self.config(name, **settings))
        self.workers.append(agent)
        return agent.start(wait=TIMEOUT)

    def send(self, *jobs: JobReady, worker: str = "w0") -> None:
        self.scheduler.publish(topics.jobs(worker), JobBatch(jobs=list(jobs)))

    def acknowledge(self, *refs: JobRef, worker: str = "w0") -> None:
        self.scheduler.publish(topics.control(worker), EventAck(jobs=list(refs)))

    def cancel(self, ref: JobRef, worker: str = "w0") -> None:
        self.scheduler.publish(topics.control(worker), CancelJob(job=ref))

    def wait_results(self, job_id: int, count: int = 1) -> list[JobFinished | JobFailed]:
        """Wait until `count` results (copies included) of job `job_id` were published."""
        messages = self.events.wait_for(
            lambda m: len(results(m, job_id)) >= count,
            TIMEOUT,
            f"{count} results of job {job_id}",
        )
        return results(messages, job_id)

    def close(self) -> None:
        for agent in reversed(self.workers):
            agent.stop()
        self.scheduler.stop()
        self.broker.close()


def station(tmp_path: Path) -> Iterator[Station]:
    """The body of a `station` fixture."""
    place = Station(tmp_path)
    try:
        yield place
    finally:
        place.close()
