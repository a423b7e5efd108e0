"""The edge worker agent: receives jobs on its own topic, runs them next to its data.

One agent thread alone owns the connection (an unthreaded bus it pumps) and the
journal. New jobs are queued for a pool of `max_jobs` runner threads (`runners.py`),
journaled, then acknowledged to the broker; the runners answer with reports through a
queue. The agent publishes their results, then journals them, and re-sends them until
the scheduler acknowledges them; a restart resumes from the journal.

A journal that refuses a write (its disk full or read-only) never stops the agent: it
keeps what is not written in memory, acknowledges nothing more to the broker (which
keeps the jobs), starts no new job, says so in its presence (the `fault` label), and
writes it all as soon as the journal takes writes again, every JOURNAL_RETRY seconds.
"""

from __future__ import annotations

import logging
import threading
import time

from pydantic import BaseModel

from flotta_mqtt import analytics as operations
from flotta_mqtt.protocol import (
    CancelJob,
    EventAck,
    JobHeartbeat,
    JobRef,
    NodePresence,
    ProtocolError,
    WorkerEvent,
    decode,
    topics,
    unbatch,
)
from flotta_mqtt.transport import FailureHandler, Will, open_bus
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker.attempts import STARTED_AFTER, Attempt, Attempts, Work
from flotta_mqtt.worker.config import WorkerConfig
from flotta_mqtt.worker.jobs import Jobs
from flotta_mqtt.worker.journal import Changes, Final, Journal
from flotta_mqtt.worker.runners import BATCH_WINDOW, Done, Reports, Runners
from flotta_mqtt.workflows.executors import Site, TaskRunner

__all__ = ["WorkerAgent", "WorkerConfig"]

log = logging.getLogger(__name__)

STOP_TIMEOUT = 30.0  # how long stop() waits for the agent thread to say goodbye
# After handing new jobs to the runners, the agent waits this long at most for a result
# before it reads the bus again: a quick job's result then leaves at once, with no
# wake-up through the bus, and the journal is written after it has gone.
LINGER = 0.002
JOURNAL_RETRY = 1.0  # seconds between attempts to write to a journal that refused a write


class WorkerAgent:
    """One worker node. `start()` connects and serves; `stop()` says goodbye.

    `on_failure` hears it if the bus gives up for good: another process took the
    worker's identity over (IdentityInUse); the agent then waits to be stopped.
    """

    def __init__(self, config: WorkerConfig, on_failure: FailureHandler | None = None) -> None:
        operations.load_plugins(config.plugins)
        self.config = config
        self.name = config.name
        self.store = ResourceStore.of(config.storage, config.broker.group)
        self.journal = Journal(config.state_dir)
        runnable = [e for e in config.executors if e != "python" or config.allow_code]
        if len(runnable) < len(config.executors):
            log.warning("worker %s: the python executor needs allow_code: true", self.name)
        self.tasks = TaskRunner(self.store, runnable, config.policy, cache=self.journal)
        self.datasets = {
            project: operations.open_dataset(project, config.name, spec)
            for project, spec in config.datasets.items()
        }
        self._jobs_topic = topics.jobs(self.name)
        self._attempts = Attempts()
        self._arrived: list[tuple[str, bytes]] = []  # read by the pump, handled after it
        self._connected = False  # a new connection: results re-sent, presence said
        self._presence_due = False  # the presence changed (a fault came or went): say it
        # Changes not written yet (the journal refused them), in order; and while it
        # refuses, the fault it reported, when to try again, the jobs not started.
        self._unwritten: list[Changes] = []
        self._fault: str | None = None
        self._retry_at = 0.0
        self._deferred: list[Attempt] = []
        self._unstarted = 0  # jobs queued for the runners that no runner has taken yet
        self._resend_at = self._beat_at = 0.0  # the agent's timers (monotonic)
        self._stopping = threading.Event()
        self._started = False
        self._closed = False
        self.bus = open_bus(
            self.name,
            config.broker,
            self._arrive,
            [topics.worker_inbox(self.name)],
            will=Will(topics.presence(self.name), self.presence(online=False)),
            on_connect=self._on_connect,
            on_failure=on_failure,
            threaded=False,  # pumped by the agent thread: no hand-over per message
        )
        self._reports = Reports(self.bus.wake)
        jobs = Jobs(self.name, self.store, self.tasks, self.datasets, self.journal)
        self._runners = Runners(
            self.name, config.max_jobs, jobs.run, self._reports, instant=jobs.instant
        )
        self._thread = threading.Thread(target=self._serve, name=f"worker-{self.name}", daemon=True)

    def presence(self, online: bool) -> NodePresence:
        return NodePresence(
            node=self.name,
            online=online,
            initiator=self.config.initiator,
            projects=sorted(self.datasets),
            labels={
                **self.config.labels,
                "allow_code": "yes" if self.config.allow_code else "no",
                **({"fault": self._fault} if self._fault else {}),
            },
            operations=sorted(operations.REGISTRY),
            executors=sorted(self.tasks.executors),
            features=self.tasks.features(),
            max_jobs=self.config.max_jobs,
            details={project: dataset.describe() for project, dataset in self.datasets.items()},
            since=time.time(),
        )

    def start(self, wait: float | None = 10.0) -> WorkerAgent:
        """Raises IdentityInUse, having run nothing, if another process is this worker."""
        self.bus.check()  # before the journal's jobs run again: they may be that process's
        config = self.config
        self.tasks.setup(
            Site(config.name, config.broker, config.storage, config.state_dir, config.allow_code)
        )
        for project, dataset in self.datasets.items():
            dataset.start(config.state_dir / "copies" / project if config.state_dir else None)
        for held in self.journal.held():  # results to re-send, jobs cut off by a restart
            attempt = self._attempts.resume(held)
            if held.final is None:
                self._submit(attempt)
        now = time.monotonic()
        self._resend_at = now + config.resend_interval
        self._beat_at = now + config.heartbeat_interval
        self._started = True
        self._runners.start()
        self._thread.start()
        try:
            self.bus.start(wait=wait)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel the jobs (those cut off run again after a restart: they are journaled),
        then say goodbye."""
        self._stopping.set()
        self.bus.wake()
        if not self._started:
            self._close()
            return
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            log.error("worker %s: the agent did not stop", self.name)

    def alive(self) -> bool:
        """Whether the agent thread and every runner still serve."""
        return self._thread.is_alive() and self._runners.alive()

    # --- the agent thread ---------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                self._reports.sleep(self.bus.pump, max(0.0, self._due(now) - now))
                try:
                    self._handle()
                except Exception:  # the agent outlives any message
                    log.exception("worker %s: agent error", self.name)
            self._handle()  # what arrived and finished meanwhile: journaled and sent
            if self._unwritten:
                self._journal(time.monotonic())
            if self._unwritten:
                log.warning(
                    "worker %s: stopping with changes not journaled: the broker delivers "
                    "again the jobs it was not told of",
                    self.name,
                )
        except Exception:
            log.exception("worker %s: agent error on stopping", self.name)
        finally:
            self._close()

    def _due(self, now: float) -> float:
        """When the agent must look again (monotonic), whatever arrives meanwhile."""
        due = min(self._resend_at, self._beat_at)
        announce_at = self._attempts.announce_at()
        if announce_at is not None:
            due = min(due, announce_at)
        if self._unstarted:  # a job may start any time: its announcement is due then
            due = min(due, now + STARTED_AFTER)
        if self._runners.backlog():  # runners hold results back: see Runners._serve
            due = min(due, now + BATCH_WINDOW)
        if self._unwritten:
            due = min(due, self._retry_at)
        return due

    def _handle(self) -> None:
        """One look: take what arrived and what the runners said, publish the events it
        produced, journal the results among them, acknowledge what arrived."""
        events: list[WorkerEvent] = []
        taken: list[Attempt] = []
        forgotten: list[JobRef] = []  # results acknowledged, attempts cancelled
        if self._arrived:
            self._take_arrived(events, taken, forgotten)
        if taken:  # a quick job's result goes out before the journal is written
            self._reports.linger(LINGER)
        now = time.monotonic()
        if self._connected:  # before new results: those are sent once below
            self._connected = False
            events += self._attempts.resend(now, older_than=0.0)
            self._say_presence()
        finals = self._take_reports(events, forgotten)
        announce_at = self._attempts.announce_at()
        if announce_at is not None and announce_at <= now:
            events += self._attempts.announcements(now)
        if now >= self._beat_at:
            running = self._attempts.running()
            if running:
                events.append(JobHeartbeat(jobs=running, at=time.time()))
            self._beat_at = now + self.config.heartbeat_interval
        if now >= self._resend_at:
            events += self._attempts.resend(now, older_than=self.config.resend_interval)
            self._resend_at = now + self.config.resend_interval
        if events:
            try:
                self.bus.publish_many(topics.events(self.name), events)
            except Exception:  # re-sent on reconnect, or when they look lost
                log.exception("worker %s: %d events not published", self.name, len(events))
        if taken or forgotten or finals:
            self._unwritten.append(Changes([a.job for a in taken], forgotten, finals))
        if self._unwritten and (self._fault is None or now >= self._retry_at):
            self._journal(now)
        if self._presence_due:  # the journal's fault came or went
            self._say_presence()
        # What arrived is journaled: the broker may forget it (withheld while it is not).
        self.bus.acknowledge()

    def _journal(self, now: float) -> None:
        """Write the looks' changes in one transaction. Written after the events went
        out, the commit is off a quick job's way; the broker is acknowledged only after
        it, so a crash before it gets the jobs delivered again. A refused write keeps
        them all, and the broker's jobs, until a later one goes through."""
        try:
            self.journal.write(self._unwritten)
        except Exception as exc:
            self._retry_at = now + JOURNAL_RETRY
            if self._fault is None:
                self._fault = f"journal: {' '.join(str(exc).split())}"
                self._presence_due = True
                self.bus.withhold(True)
                log.error(
                    "worker %s: the journal %s refused a write (%s): taking no new job and "
                    "acknowledging nothing to the broker until it takes writes again (tried "
                    "every %s s); free space on its disk or make it writable",
                    self.name,
                    self.journal.path,
                    exc,
                    JOURNAL_RETRY,
                )
            return
        self._unwritten = []
        if self._fault is not None:
            log.warning(
                "worker %s: the journal takes writes again; starting the %d jobs that waited",
                self.name,
                len(self._deferred),
            )
            self._fault = None
            self._presence_due = True
            self.bus.withhold(False)
            deferred, self._deferred = self._deferred, []
            for attempt in deferred:
                self._submit(attempt)

    def _say_presence(self) -> None:
        self._presence_due = False
        try:
            online = self.presence(online=True)
            self.bus.publish(topics.presence(self.name), online, retain=True)
        except Exception:  # said again on the next connection
            log.exception("worker %s: presence not published", self.name)

    def _take_arrived(
        self, events: list[WorkerEvent], taken: list[Attempt], acknowledged: list[JobRef]
    ) -> None:
        """Handle the messages the pump read: new jobs are queued for the runners (and
        added to `taken`, journaled by `_handle` later in the same look), duplicates
        answered in `events`, acknowledged results added to `acknowledged`."""
        arrived, self._arrived = self._arrived, []
        for topic, payload in arrived:
            try:
                _, message = decode(topic, payload)
            except ProtocolError as exc:
                log.error("worker %s rejected a message: %s", self.name, exc)
                continue
            self._attempts.heard = time.monotonic()
            if topic == self._jobs_topic:
                for job in unbatch(message):
                    outcome = self._attempts.receive(job)
                    if isinstance(outcome, Attempt):
                        taken.append(outcome)
                        if self._fault is None:
                            self._submit(outcome)
                        else:  # started once it is journaled
                            self._deferred.append(outcome)
                    elif outcome is not None:
                        events.append(outcome)
            elif isinstance(message, EventAck):
                self._attempts.acknowledged(message.jobs)
                acknowledged += message.jobs
            elif isinstance(message, CancelJob):
                attempt = self._attempts.get(message.job)
                if attempt is not None:
                    attempt.cancelled.set()
            else:
                log.error(
                    "worker %s: unexpected %s on %s", self.name, type(message).__name__, topic
                )

    def _take_reports(self, events: list[WorkerEvent], forgotten: list[JobRef]) -> list[Final]:
        """What the runners said: starts noted, results added to `events` and returned,
        cancelled attempts they are through with added to `forgotten`."""
        finals: list[Final] = []
        now = time.monotonic()
        for report in self._reports.take():
            if isinstance(report, Done):
                final = self._attempts.finished(report.work, report.final, now)
                if isinstance(final, JobRef):
                    forgotten.append(final)
                elif final is not None:
                    finals.append(final)
            else:
                self._unstarted -= 1
                self._attempts.started(report.work, report.at, report.clock)
        events += finals
        return finals

    def _submit(self, attempt: Attempt) -> None:
        self._unstarted += 1
        self._runners.submit(Work(attempt.job, attempt.cancelled))

    def _arrive(self, topic: str, payload: bytes) -> None:
        """A bus callback, on the agent thread inside `pump()`: handled after it returns."""
        self._arrived.append((topic, payload))

    def _on_connect(self, session_present: bool) -> None:
        self._connected = True

    def _close(self) -> None:
        """Cancel the jobs, close the executors, say goodbye, close the journal."""
        if self._closed:
            return
        self._closed = True
        self._attempts.cancel_all()
        self._runners.stop()
        self.tasks.close()
        for project, dataset in self.datasets.items():
            try:
                dataset.close()
            except Exception:  # the others are closed and the goodbye said all the same
                log.exception("worker %s: project %s did not close", self.name, project)
        try:
            offline: BaseModel = self.presence(online=False)
            self.bus.stop(goodbye=[(topics.presence(self.name), offline, True)])
        except Exception:
            log.exception("worker %s: no goodbye", self.name)
        self.journal.close()
