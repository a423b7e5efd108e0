"""The scheduler service: wires the core to the bus and the repository.

One thread does all the work, the bus's network work included (an unthreaded bus): it
reads what has arrived, takes it (up to BURST messages, never waiting for more), has the
core decide, writes the decisions in one transaction, commits, and only then deletes what
the database no longer names (a pruned artifact's store objects and retained status) and
publishes (the jobs made ready first, then the statuses built from what was committed)
and lets the broker forget what it delivered. A wake with nothing to write opens no
transaction.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from flotta_mqtt.protocol import JobReady, Resource, topics
from flotta_mqtt.scheduler.announcements import build_status
from flotta_mqtt.scheduler.config import BURST, TICK, SchedulerConfig
from flotta_mqtt.scheduler.core import Policies, SchedulerCore
from flotta_mqtt.scheduler.effects import (
    Clock,
    Connected,
    Decision,
    Event,
    Outgoing,
    Received,
    Tick,
)
from flotta_mqtt.scheduler.metrics import Gauges, MetricsServer, SchedulerMetrics
from flotta_mqtt.scheduler.records import ArtifactRecord, restore
from flotta_mqtt.scheduler.repository import Repository
from flotta_mqtt.transport import FailureHandler, open_bus
from flotta_mqtt.transport.settings import load_registry
from flotta_mqtt.transport.store import RESULTS_MANIFEST, ResourceStore

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 2.0  # seconds a metrics scrape waits for the scheduler thread


class Scheduler:
    """The scheduler service. `start()` resumes unfinished artifacts and serves.

    `on_failure` hears it if the bus gives up for good (IdentityInUse: another process took
    the scheduler's identity over); the scheduler then waits to be stopped.
    """

    def __init__(self, config: SchedulerConfig, on_failure: FailureHandler | None = None) -> None:
        self.config = config
        self.repository = Repository(config.database)
        self.metrics = SchedulerMetrics()
        registry = load_registry(config.registry) if config.registry else None
        policies = Policies.of(config, random.Random())
        self.core = SchedulerCore(config, self.metrics, policies, registry)
        self.metrics_server: MetricsServer | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._out: list[Outgoing] = []
        self._store: ResourceStore | None = None  # made when first needed
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
            on_connect=lambda session: self._inbox.put(("connected", Connected())),
            on_failure=on_failure,
            threaded=False,  # driven by the scheduler thread: see the module's docstring
        )

    def start(self, wait: float | None = 10.0) -> Scheduler:
        """Raises IdentityInUse, having changed nothing, if another process is this
        scheduler (its database may be that process's too)."""
        self.bus.check()
        self._resume()
        self._thread.start()
        self.bus.start(wait=wait)
        if self.config.metrics_port is not None:
            self.metrics_server = MetricsServer(
                self.metrics, self.config.metrics_port, sample=self.snapshot
            ).start()
        return self

    def stop(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self._stopping.set()
        self._inbox.put(("stop", None))
        self.bus.wake()
        self._thread.join(timeout=10)
        self.bus.stop()
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

    def _resume(self) -> None:
        """Take up every unfinished artifact the repository holds."""
        repository = self.repository
        unfinished: list[ArtifactRecord] = []
        for artifact_id in repository.unfinished_artifacts():
            row = repository.artifact(artifact_id)
            assert row is not None
            unfinished.append(restore(row, repository.jobs(artifact_id)))
        decision = self.core.restore(
            repository.nodes(),
            repository.owners(),
            repository.finished_artifacts(),
            unfinished,
            self._clock(),
        )
        commit(self.repository, decision)
        self._out += decision.publish
        self._announce(decision)

    def _serve(self) -> None:
        next_tick = time.monotonic() + TICK
        while not self._stopping.is_set():
            burst: list[tuple[str, Any]] = []
            core = self.core
            dues = (core.next_status_due(), core.next_ack_due(), core.next_prune_due())
            wake = min([next_tick, *(due for due in dues if due is not None)])
            if self._inbox.empty():  # read the socket, waiting until then at most
                self.bus.pump(max(0.0, wake - time.monotonic()))
            try:
                while len(burst) < BURST:
                    burst.append(self._inbox.get_nowait())
            except queue.Empty:
                self._caught_up = time.monotonic()  # the inbox is drained
            else:
                # Cut at BURST with more waiting: caught up to the last message taken.
                self._caught_up = next(
                    (item.arrived for kind, item in reversed(burst) if kind == "message"),
                    self._caught_up,
                )
            events: list[Event] = []
            for kind, item in burst:
                if kind == "call":
                    self._run(item)
                elif kind != "stop":
                    events.append(item)
            clock = self._clock()
            if clock.monotonic >= next_tick:
                events.append(Tick())
                next_tick = clock.monotonic + TICK
            self._carry_out(events, clock, len(burst))

    def _carry_out(self, events: list[Event], clock: Clock, received: int) -> None:
        """Have the core decide on a burst, then write, commit and publish what it did."""
        try:
            decision = self.core.handle(events, clock)
            commit(self.repository, decision)
        except Exception:
            log.exception("scheduler: a burst of %d messages failed", received)
            self._out.clear()
            return
        self._discard(decision.pruned)
        self._out += decision.publish
        self._publish()
        self.bus.acknowledge()  # what the burst handled is committed: the broker may forget it
        # The statuses are built once the jobs the burst made ready are on their way.
        self._announce(decision)
        self._publish()

    def _clock(self) -> Clock:
        now = time.monotonic()
        return Clock(now, time.time(), self._caught_up)

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
            try:
                self.bus.publish_many(topic, batch)
            except Exception:
                log.exception("scheduler: could not publish on %s", topic)
        for topic, message, retain in rest:
            try:
                self.bus.publish(topic, message, retain=retain)
            except Exception:
                log.exception("scheduler: could not publish on %s", topic)

    @property
    def store(self) -> ResourceStore:
        """The resource store, opened when first needed."""
        if self._store is None:
            self._store = ResourceStore.of(self.config.storage)
        return self._store

    def _results_manifest(self, artifact_id: str, results: list[Resource]) -> Resource | None:
        """Store the list of an artifact's results; the status carries where it is."""
        try:
            data = json.dumps([r.model_dump(mode="json") for r in results]).encode()
            return self.store.put(
                self.store.results_url(artifact_id), data, media_type=RESULTS_MANIFEST
            )
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
