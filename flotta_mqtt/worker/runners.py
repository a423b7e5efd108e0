"""A worker's runner threads: they take jobs from a queue, run them, and report to the
agent through another; they never touch the bus or the journal."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from flotta_mqtt.logs import log_context
from flotta_mqtt.protocol import JobReady
from flotta_mqtt.worker.attempts import STARTED_AFTER, Work
from flotta_mqtt.worker.journal import Final

log = logging.getLogger(__name__)

# What a runner does with a job: run it from `started` (wall clock) unless `cancelled`.
Execute = Callable[[JobReady, threading.Event, float], Final]
# A result finished while other jobs wait their turn may wait this long for the results
# after it: a busy worker sends a message per batch of results, not per job.
BATCH_WINDOW = 0.01


@dataclass(frozen=True)
class Started:
    """A runner took a job at `at` (wall clock), `clock` (monotonic), and runs it unless
    it is cancelled. `work` is what the runner was given: it tells this attempt from a
    later one of the same job and attempt number (taken again after it was dropped)."""

    work: Work
    at: float
    clock: float


@dataclass(frozen=True)
class Done:
    """A runner is through with `work`: its result, or None if it was cancelled or broke."""

    work: Work
    final: Final | None


Report = Started | Done


class Reports:
    """What the runners tell the agent, and a wake-up for an agent asleep in its pump.

    The agent says until when it sleeps, then looks for reports, then waits; a runner
    puts, then looks whether the agent sleeps past when its report is due. One of the two
    sees the other, so no report waits longer than it may, and a runner wakes a sleeping
    agent once at most. Starts and results travel apart, so that an agent lingering for
    a result (`linger`) is not woken by the start before it.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._started: deque[Started] = deque()
        self._done: queue.SimpleQueue[Done] = queue.SimpleQueue()
        self._lingered: list[Done] = []  # taken off the queue by linger(), not yet seen
        self._wake = wake
        self._wakes_at: float | None = None  # monotonic; None while the agent is awake

    def put(self, report: Report, within: float = 0.0) -> None:
        """From a runner: a report the agent must see within `within` seconds."""
        if isinstance(report, Started):
            self._started.append(report)
        else:
            self._done.put(report)
        wakes_at = self._wakes_at
        if wakes_at is not None and wakes_at > time.monotonic() + within:
            self._wakes_at = None
            self._wake()

    def sleep(self, wait: Callable[[float], object], timeout: float) -> None:
        """From the agent: `wait(timeout)` (its pump) unless a report is waiting already."""
        self._wakes_at = time.monotonic() + timeout
        if not (self._started or self._lingered) and self._done.empty():
            wait(timeout)
        self._wakes_at = None

    def linger(self, timeout: float) -> None:
        """From the agent: wait up to `timeout` for a runner to be through with a job."""
        with contextlib.suppress(queue.Empty):
            self._lingered.append(self._done.get(timeout=timeout))

    def take(self) -> list[Report]:
        """Every report waiting, a job's start before its result, without waiting."""
        done, self._lingered = self._lingered, []
        try:
            while True:
                done.append(self._done.get_nowait())
        except queue.Empty:
            pass
        # Taken after the results: a runner adds a start before the result that follows.
        reports: list[Report] = []
        while self._started:
            reports.append(self._started.popleft())
        return reports + done


class Runners:
    """`count` threads running jobs in the order queued, so never more than `count` at once;
    an instant job (see `submit`) runs on the submitting thread instead."""

    def __init__(
        self,
        worker: str,
        count: int,
        execute: Execute,
        reports: Reports,
        instant: Callable[[JobReady], bool] = lambda job: False,
    ) -> None:
        self._worker = worker
        self._execute = execute
        self._instant = instant
        self._reports = reports
        self._queue: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"worker-{worker}-runner-{i}", daemon=True)
            for i in range(count)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, work: Work) -> None:
        """Queue `work`; an instant job with none queued before it runs here at once: it
        costs less than the two thread hand-offs (to a runner and back) that it saves."""
        if self._instant(work.job) and self._queue.empty():
            self._run(work)
        else:
            self._queue.put(work)

    def backlog(self) -> bool:
        """Whether jobs wait for a runner."""
        return not self._queue.empty()

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        """Let each runner leave after the jobs queued (cancelled, they end at once)."""
        for _ in self._threads:
            self._queue.put(None)

    def _serve(self) -> None:
        while (work := self._queue.get()) is not None:
            self._run(work)

    def _run(self, work: Work) -> None:
        job = work.job
        started = time.time()
        # The agent waits for it no longer than it would to announce the job.
        self._reports.put(Started(work, started, time.monotonic()), within=STARTED_AFTER)
        final: Final | None = None
        try:
            if not work.cancelled.is_set():
                ids = {"artifact_id": job.artifact_id, "job_id": job.job_id}
                with log_context(**ids, attempt=job.attempt, worker=self._worker):
                    final = self._execute(job, work.cancelled, started)
        except Exception:  # a runner outlives any job
            log.exception("worker %s: job %s/%s not run", self._worker, job.artifact_id, job.job_id)
        finally:
            # The result of a job with others queued behind it may wait for theirs:
            # they leave together, in one message.
            within = BATCH_WINDOW if self.backlog() else 0.0
            self._reports.put(Done(work, final), within=within)
