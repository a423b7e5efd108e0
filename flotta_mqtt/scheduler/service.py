"""The scheduler service: wires the core to the bus and the repository.

One thread does all the work, the bus's network work included (an unthreaded bus): it
reads what has arrived, takes it (up to BURST messages, never waiting for more), has the
core decide, writes the decisions in one transaction, commits, and only then deletes what
the database no longer names (a pruned artifact's store objects and retained status) and
publishes (the jobs made ready first, then the statuses built from what was committed)
and lets the broker forget what it delivered. A wake with nothing to write opens no
transaction; one that brought nothing (the broker's acknowledgements only) runs no burst.

A commit the database refuses (its disk full or read-only, the file deleted) publishes
nothing of the burst. The core has run ahead of the database, so it is set aside: until
a fresh core restored from the database commits, the scheduler acknowledges nothing more
to the broker, holds what arrives to handle it then, and refuses each submission,
cancellation and prune at once, saying it could not be recorded. It tries every STORE_RETRY s.

On PostgreSQL, schedulers of one name stand by for one another: `start()` first waits
for the lease (see lease.py), and a scheduler that loses it publishes nothing more and
reports LeaseLost to `on_failure`, as a bus giving up does.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from flotta_mqtt import sqlite
from flotta_mqtt.protocol import JobReady, NodePresence, Resource, topics
from flotta_mqtt.scheduler.announcements import build_status
from flotta_mqtt.scheduler.config import BURST, TICK, SchedulerConfig
from flotta_mqtt.scheduler.core import Policies, SchedulerCore
from flotta_mqtt.scheduler.databases import open_repository
from flotta_mqtt.scheduler.effects import (
    Clock,
    Connected,
    Decision,
    Event,
    Outgoing,
    Received,
    Tick,
)
from flotta_mqtt.scheduler.intake import refusals
from flotta_mqtt.scheduler.lease import Lease, LeaseLost, take_identity
from flotta_mqtt.scheduler.metrics import Gauges, MetricsServer, SchedulerMetrics
from flotta_mqtt.scheduler.postgres_repository import PostgresRepository
from flotta_mqtt.scheduler.records import ArtifactRecord, restore
from flotta_mqtt.scheduler.repository import Repository
from flotta_mqtt.transport import FailureHandler, open_bus
from flotta_mqtt.transport.settings import load_registry
from flotta_mqtt.transport.store import ResourceStore

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 2.0  # seconds a metrics scrape waits for the scheduler thread
STORE_RETRY = 1.0  # seconds between attempts to commit to a database that refused a commit


class Scheduler:
    """The scheduler service. `start()` resumes unfinished artifacts and serves.

    `on_failure` hears it if the bus gives up for good (IdentityInUse: another process took
    the scheduler's identity over); the scheduler then waits to be stopped.
    """

    def __init__(self, config: SchedulerConfig, on_failure: FailureHandler | None = None) -> None:
        self.config = config
        self.repository = open_repository(config.database, config.name)
        pg = self.repository if isinstance(self.repository, PostgresRepository) else None
        self.lease = Lease(pg.url, config.name) if pg else None  # leading takes it first
        self._on_failure = on_failure
        self.lease_lost = threading.Event()  # set: nothing more is published
        self.metrics = SchedulerMetrics()
        self._registry = load_registry(config.registry) if config.registry else None
        self._policies = Policies.of(config, random.Random())
        self.core = self._new_core()
        # While the database refuses commits: why, what waits to be handled, when to retry.
        self.fault: str | None = None
        self._held: list[Event] = []
        self._retry_at = 0.0
        self._new_database = False  # checked against the broker's session (see start)
        self.metrics_server: MetricsServer | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._out: list[Outgoing] = []
        self._store: ResourceStore | None = None  # made when first needed
        self.wall: Callable[[], float] = time.time  # the core's clock (a test sets its own)
        # Everything received up to this moment has been handled (see resends).
        self._caught_up = time.monotonic()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scheduler", daemon=True)
        self.bus = open_bus(
            config.name,
            config.broker,
            on_message=lambda topic, payload: self._inbox.put(
                ("message", Received(topic, payload, time.monotonic()))
            ),
            subscriptions=[topics.ALL_REQUESTS, topics.ALL_EVENTS, topics.ALL_PRESENCE],
            on_connect=self._on_connect,
            on_failure=on_failure,
            threaded=False,  # driven by the scheduler thread: see the module's docstring
        )

    def start(self, wait: float | None = 10.0) -> Scheduler:
        """Raises IdentityInUse, having changed nothing, if another process is this scheduler
        (its database may be that process's too). On PostgreSQL it first waits to lead."""
        self.lead()
        self._new_database = self.repository.new
        take_identity(self.bus.check, self.config.broker.keepalive if self.lease else 0)
        try:
            self._resume(self.core)
        except Exception as exc:  # a full disk at start: served once it has room
            if not self.repository.is_refusal(exc):
                raise
            self._stall([], exc)
        self._out += self.core.served.entries()  # the directory: which group serves what
        self._thread.start()
        self.bus.start(wait=wait)
        if self.config.metrics_port is not None:
            self.metrics_server = MetricsServer(
                self.metrics, self.config.metrics_port, sample=self.snapshot
            ).start()
        return self

    def lead(self, stopping: threading.Event | None = None) -> bool:
        """Wait until this scheduler leads (at once on SQLite); False if `stopping` was
        set first. Its database writes only while it leads, and losing the lease stops it."""
        if self.lease is None or self.lease.held:
            return True
        assert isinstance(self.repository, PostgresRepository)
        return self.lease.lead(self.repository.fence, self._lose_lease, stopping)

    def _lose_lease(self, error: LeaseLost) -> None:
        """Publish nothing more (checked before each message), drop the bus (its session
        is the next leader's, with all not acknowledged) and have the node stop."""
        if self.lease_lost.is_set():
            return
        self.lease_lost.set()
        self._stopping.set()
        self.bus.wake()  # the scheduler thread drops the bus at once
        log.error("scheduler: %s: it publishes nothing more and stops", error)
        if self._on_failure is not None:
            self._on_failure(error)

    def stop(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self._stopping.set()
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self.bus.wake()
            self._thread.join(timeout=10)
        self.bus.stop()
        if self.lease is not None:
            self.lease.release()
        self.repository.close()

    @property
    def running(self) -> bool:
        """Whether the scheduler thread is serving."""
        return self._thread.is_alive()

    def call(self, function: Callable[[], Any]) -> None:
        """Run `function` on the scheduler thread, between bursts."""
        self._inbox.put(("call", function))
        self.bus.wake()

    @staticmethod
    def _run(function: Callable[[], Any]) -> None:
        try:
            function()
        except Exception:
            log.exception("scheduler: a call on its thread failed")

    def snapshot(self, timeout: float = SNAPSHOT_TIMEOUT) -> Gauges | None:
        """The core's present state (taken on its thread); None if it is too busy."""
        done = threading.Event()
        box: list[Gauges] = []

        def take() -> None:
            box.append(self.core.snapshot())
            done.set()

        self.call(take)
        return box[0] if done.wait(timeout) else None

    # --- the scheduler thread --------------------------------------------------------------

    def _new_core(self) -> SchedulerCore:
        return SchedulerCore(self.config, self.metrics, self._policies, self._registry)

    def _on_connect(self, session_present: bool) -> None:
        if self._new_database and session_present:
            log.error(
                "scheduler: its database %s is new, but the broker kept this scheduler's "
                "session: if the database it ran with was deleted or moved, the artifacts "
                "recorded there are forgotten here (their last statuses stay retained on "
                "the broker); stop it and put that database back to keep them",
                self.repository.where,
            )
        self._new_database = False  # said once, at the first connection
        self._inbox.put(("connected", Connected()))

    def _resume(self, core: SchedulerCore, nodes: dict[str, NodePresence] | None = None) -> None:
        """Have `core` take up every unfinished artifact the repository holds, and commit
        what it decided; it serves from then on. `nodes`: the nodes as the bus said they
        are (a core restored while the scheduler runs: their presences, retained, are not
        sent again); without them, offline until their presences come."""
        repository = self.repository
        core.schedules.restore(repository.schedules())
        unfinished: list[ArtifactRecord] = []
        for artifact_id in repository.unfinished_artifacts():
            row = repository.artifact(artifact_id)
            assert row is not None
            unfinished.append(restore(row, repository.jobs(artifact_id)))
        decision = core.restore(
            repository.nodes(),
            repository.owners(),
            repository.finished_artifacts(),
            unfinished,
            self._clock(),
        )
        if nodes is not None:
            core.nodes = dict(nodes)
        commit(self.repository, decision)
        self.core = core
        self._out += decision.publish
        self._announce(decision)

    def _serve(self) -> None:
        next_tick = time.monotonic() + TICK
        while not self._stopping.is_set():
            burst: list[tuple[str, Any]] = []
            wake = self._retry_at if self.fault is not None else self._wake_at(next_tick)
            if self._inbox.empty():  # read the socket, waiting until then at most
                self.bus.pump(max(0.0, wake - time.monotonic()))
            try:
                while len(burst) < BURST:
                    burst.append(self._inbox.get_nowait())
            except queue.Empty:
                self._caught_up = time.monotonic()  # the inbox is drained
            else:  # cut at BURST with more waiting: caught up to the last message taken
                self._caught_up = next(
                    (item.arrived for kind, item in reversed(burst) if kind == "message"),
                    self._caught_up,
                )
            for kind, item in burst:
                if kind == "call":
                    self._run(item)
            events: list[Event] = [item for kind, item in burst if kind not in ("call", "stop")]
            clock = self._clock()
            if not burst and clock.monotonic < wake:
                continue  # the pump saw only the broker's acknowledgements: nothing to do
            if self.fault is not None:
                self._wait_for_store(events, clock)
                continue
            if clock.monotonic >= next_tick:
                events.append(Tick())
                next_tick = clock.monotonic + TICK
            self._carry_out(events, clock, len(burst))
        if self.lease_lost.is_set():
            self.bus.kill()

    def _wake_at(self, next_tick: float) -> float:
        """When the core is due to look again (monotonic), whatever arrives meanwhile."""
        core = self.core
        dues = (core.next_status_due(), core.next_ack_due(), core.next_prune_due())
        return min([next_tick, *(due for due in dues if due is not None)])

    def _carry_out(self, events: list[Event], clock: Clock, received: int) -> None:
        """Have the core decide on a burst, then write, commit and publish what it did."""
        try:
            decision = self.core.handle(events, clock)
            commit(self.repository, decision)
        except LeaseLost as exc:
            self._lose_lease(exc)
            return
        except Exception as exc:
            if self.repository.is_refusal(exc):
                self._stall(events, exc)
            else:
                log.exception("scheduler: a burst of %d messages failed", received)
                self._out.clear()
            return
        self._discard(decision.pruned)
        self._out += decision.publish
        self._publish()
        if self._inbox.empty():  # all received is committed: the broker may forget it
            self.bus.acknowledge()
        # The statuses are built once the jobs the burst made ready are on their way.
        self._announce(decision)
        self._publish()

    # --- a database refusing commits -------------------------------------------------------

    def _stall(self, events: list[Event], exc: Exception) -> None:
        """The database refused a commit: nothing of it goes out, nothing more is
        acknowledged to the broker, and `events` wait for a core restored from it."""
        self._out.clear()
        if self.fault is None:
            self.fault = " ".join(str(exc).split())
            self.bus.withhold(True)
            hint = "free space on its disk or make it writable, or start its server"
            if isinstance(exc, sqlite.StoreMoved):
                hint = (
                    "what is written now would be lost at the stop: copy the open file and "
                    f"its -wal back (`ls -l /proc/{os.getpid()}/fd` shows them), then restart"
                )
            log.error(
                "scheduler: its database %s refused a write (%s): acknowledging nothing to "
                "the broker and refusing submissions and cancellations until it takes "
                "writes again (tried every %s s); %s",
                self.repository.where,
                self.fault,
                STORE_RETRY,
                hint,
            )
        self._retry_at = time.monotonic() + STORE_RETRY
        self._hold(events)

    def _hold(self, events: list[Event]) -> None:
        """Refuse at once the requests among `events` that would be recorded; keep the
        rest (worker events, presence, status requests) to handle once it can be."""
        error = f"the scheduler's database refused the write ({self.fault}); send it again later"
        answers, rest = refusals(events, error)
        self._held += rest
        self._out += answers
        self._publish()

    def _wait_for_store(self, events: list[Event], clock: Clock) -> None:
        """While the database refuses commits: hold what arrived; when it is time, try
        again with a fresh core restored from the database, then the held events."""
        self._hold(events)
        if clock.monotonic < self._retry_at:
            return
        try:
            self.repository.probe()
            self._resume(self._new_core(), self.core.nodes)
        except LeaseLost as exc:
            self._lose_lease(exc)
            return
        except Exception as exc:
            if not self.repository.is_refusal(exc):
                log.exception("scheduler: could not take up from its database again")
            self._stall([], exc)
            return
        held, self._held = self._held, []
        log.warning(
            "scheduler: its database takes writes again; handling %d held messages", len(held)
        )
        self.fault = None
        self.bus.withhold(False)
        self._carry_out(held, clock, len(held))  # stalls again if the database refuses it

    def _clock(self) -> Clock:
        now = time.monotonic()
        return Clock(now, self.wall(), self._caught_up)

    def _announce(self, decision: Decision) -> None:
        """Queue the statuses the decision recorded (committed by now)."""
        for record, wall in decision.statuses:
            try:
                status = build_status(
                    record, wall, self.config.allow_download, self._results_manifest
                )
            except Exception:
                log.exception("scheduler: could not build the status of %s", record.id)
                continue
            self._out.append((topics.status(record.client, record.id), status, True))

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
            if self.lease_lost.is_set():
                return
            try:
                self.bus.publish_many(topic, batch)
            except Exception:
                log.exception("scheduler: could not publish on %s", topic)
        for topic, message, retain in rest:
            if self.lease_lost.is_set():
                return
            try:
                self.bus.publish(topic, message, retain=retain)
            except Exception:
                log.exception("scheduler: could not publish on %s", topic)

    @property
    def store(self) -> ResourceStore:
        """The resource store, opened when first needed."""
        if self._store is None:
            self._store = ResourceStore.of(self.config.storage, self.config.broker.group)
        return self._store

    def _results_manifest(self, artifact_id: str, results: list[Resource]) -> Resource | None:
        """Store the list of an artifact's results; the status carries where it is."""
        try:
            return self.store.put_results(artifact_id, results)
        except Exception:
            log.exception("scheduler: could not store the results of %s", artifact_id)
            return None

    def _discard(self, pruned: list[tuple[str, str]]) -> None:
        """Delete what pruned artifacts left outside the database (their rows are gone,
        committed): their store objects, and their retained status (an empty retained
        message clears it), before the prune's report goes out."""
        for owner, artifact_id in pruned:
            try:
                self.store.delete_tree(self.store.artifact_root(artifact_id))
            except Exception:
                log.exception("scheduler: the store objects of pruned %s remain", artifact_id)
            try:
                self.bus.publish_raw(topics.status(owner, artifact_id), b"", retain=True)
            except Exception:
                log.exception("scheduler: the retained status of pruned %s remains", artifact_id)


def commit(repository: Repository, decision: Decision) -> None:
    """Write what the core decided in one transaction (none when there is nothing to
    write), and add the stored statuses it asked to announce again to its statuses.

    A finished artifact's status is announced again as stored, with its seq unchanged: a
    reader that has it already ignores it, and asking about an artifact writes nothing."""
    if decision.writes:
        with repository.transaction():
            repository.apply(decision.writes)
    for artifact_id in decision.stored:
        row = repository.artifact(artifact_id)
        if row is None:
            continue
        record = restore(row, repository.jobs(artifact_id) if row.context else [])
        decision.statuses.append((record, time.time()))
