"""Simulated workers for the `workers` bench: many real MQTT sessions on one selector loop.

Each simulated worker is its own MQTT v5 client (its own TCP connection, client id and
persistent session) and speaks the protocol as `flotta_mqtt/worker/` does, so the real
scheduler cannot tell it from a worker: its retained NodePresence (project, the `noop`
operation and executor) with an offline will; its inbox subscribed at QoS 1; every
JobReady (alone or in a JobBatch) answered with a JobFinished whose tiny product is inline
(a `data:` URL), the events of one message sent as one EventBatch; a duplicate JobReady
answered with the result it already sent, a stale attempt ignored; results re-sent until
an EventAck names them, all of them after a reconnect; offline presence on stopping.

What it leaves out is what the scheduler never sees: running anything (jobs are no-ops
answered at once, so no JobStarted and no heartbeats), a journal, and the claim on its
identity (transport/claims.py: a probe connection before each connection and a retained
claim every keepalive, both between a node and the broker only).

Cheap by design: paho clients driven by paho's external-loop API (`loop_read`,
`loop_write`, `loop_misc` and the socket callbacks) on one `selectors` loop, no thread
per session. Messages are decoded and encoded with the protocol's own codec.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flotta_mqtt.protocol import (
    CancelJob,
    EventAck,
    JobFailed,
    JobFinished,
    JobReady,
    NodePresence,
    ProtocolError,
    RemoteError,
    decode,
    encode,
    encode_batches,
    topics,
    unbatch,
)
from flotta_mqtt.transport.store import ResourceStore

log = logging.getLogger("bench.fleet")

OPERATION = "noop"  # the analytics operation and the workflow executor the workers offer
KEEPALIVE = 15  # BrokerSettings' defaults
SESSION_EXPIRY = 24 * 3600
INFLIGHT = 100
CONNECTS_PER_STEP = 50  # new connections opened per loop step while starting
RECONNECT_DELAY = 1.0
MISC_INTERVAL = 1.0  # seconds between paho's keepalive checks of every session

JobKey = tuple[str, int]  # artifact id, job id


@dataclass
class Sent:
    """A result sent and not yet acknowledged."""

    attempt: int
    result: JobFinished | JobFailed
    sent_at: float  # monotonic


@dataclass
class Stats:
    """What a fleet saw, summed over its sessions."""

    received: Counter[str] = field(default_factory=Counter)  # messages by type
    sent: Counter[str] = field(default_factory=Counter)  # publishes: events, presence
    jobs: int = 0  # new attempts answered
    duplicates: int = 0  # JobReady of an attempt already answered (answered again)
    stale: int = 0  # JobReady of an older attempt (ignored)
    resent: int = 0  # results published again
    connects: int = 0  # CONNACKs accepted (reconnects included)
    failed: int = 0  # jobs answered with JobFailed (an input did not verify)
    errors: int = 0  # invalid messages, failed publishes
    # Seconds from a worker's result for round r of an artifact to its JobReady of round
    # r + 1: the scheduler's turnaround plus two broker hops, per dependent job.
    turnaround: list[float] = field(default_factory=list)

    def add(self, other: Stats) -> None:
        """Add another fleet's figures to these."""
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


class SimWorker:
    """One simulated worker: one paho client, its results awaiting acknowledgement."""

    def __init__(self, fleet: Fleet, name: str, project: str) -> None:
        self.fleet = fleet
        self.name = name
        self.project = project
        self.jobs_topic = topics.jobs(name)
        self.events_topic = topics.events(name)
        self.ready = False  # subscribed and presence said
        self.reconnect_at: float | None = None
        self.unacknowledged: dict[JobKey, Sent] = {}
        self.last_round: dict[str, tuple[int, float]] = {}  # artifact → (iteration, sent at)
        self._subscribe_mid: int | None = None
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        client.user_data_set(self)
        client.max_inflight_messages_set(INFLIGHT)
        will = encode(self.presence(online=False))
        client.will_set(topics.presence(name), will, qos=1, retain=True)
        client.on_socket_open = fleet.socket_opened
        client.on_socket_close = fleet.socket_closed
        client.on_socket_register_write = fleet.want_write
        client.on_socket_unregister_write = fleet.written
        client.on_connect = fleet.guard(self._connected)
        client.on_subscribe = fleet.guard(self._subscribed)
        client.on_message = fleet.guard(self._message)
        client.on_disconnect = fleet.guard(self._disconnected)
        self.client = client

    def presence(self, online: bool) -> NodePresence:
        return NodePresence(
            node=self.name,
            online=online,
            projects=[self.project],
            labels={"allow_code": "no"},
            operations=[OPERATION],
            executors=[OPERATION],
            max_jobs=1,
            since=time.time(),
        )

    def connect(self) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY
        try:
            self.client.connect(
                self.fleet.host,
                self.fleet.port,
                keepalive=KEEPALIVE,
                clean_start=False,
                properties=properties,
            )
        except OSError as exc:
            log.warning("%s: connection failed (%s): retrying", self.name, exc)
            self.reconnect_at = time.monotonic() + RECONNECT_DELAY

    def publish(self, topic: str, payload: bytes, kind: str, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self.fleet.stats.errors += 1
            log.error("%s: publish on %s failed: %s", self.name, topic, mqtt.error_string(info.rc))
            return
        self.fleet.stats.sent[kind] += 1

    def resend(self, older_than: float) -> None:
        """Publish again the results unacknowledged for `older_than` seconds."""
        now = time.monotonic()
        due = [sent for sent in self.unacknowledged.values() if now - sent.sent_at >= older_than]
        if not due:
            return
        for sent in due:
            sent.sent_at = now
        for payload in encode_batches([sent.result for sent in due]):
            self.publish(self.events_topic, payload, "events (again)")
        self.fleet.stats.resent += len(due)

    # --- paho callbacks (the fleet's loop) ------------------------------------------------

    def _connected(self, client: mqtt.Client, _: Any, flags: Any, reason: Any, __: Any) -> None:
        if reason.is_failure:
            log.error("%s: the broker refused the connection: %s", self.name, reason)
            return
        self.fleet.stats.connects += 1
        _, self._subscribe_mid = client.subscribe(topics.worker_inbox(self.name), qos=1)

    def _subscribed(self, _: Any, __: Any, mid: int, reasons: list[Any], ___: Any) -> None:
        if mid != self._subscribe_mid:
            return
        self.publish(topics.presence(self.name), encode(self.presence(True)), "presence", True)
        self.resend(older_than=0.0)  # whatever a lost connection may have swallowed
        if not self.ready:
            self.ready = True
            self.fleet.ready += 1

    def _disconnected(self, _: Any, __: Any, ___: Any, reason: Any, ____: Any) -> None:
        if not self.fleet.stopping:
            log.warning("%s: disconnected (%s): reconnecting", self.name, reason)
            self.reconnect_at = time.monotonic() + RECONNECT_DELAY

    def _message(self, _: Any, __: Any, message: mqtt.MQTTMessage) -> None:
        stats = self.fleet.stats
        try:
            _, decoded = decode(message.topic, bytes(message.payload))
        except ProtocolError as exc:
            stats.errors += 1
            log.error("%s rejected a message: %s", self.name, exc)
            return
        stats.received[type(decoded).__name__] += 1
        if message.topic == self.jobs_topic:
            events = [e for job in unbatch(decoded) if (e := self._answer(job)) is not None]
            for payload in encode_batches(events) if events else []:
                self.publish(self.events_topic, payload, "events")
        elif isinstance(decoded, EventAck):
            for ref in decoded.jobs:
                key = (ref.artifact_id, ref.job_id)
                sent = self.unacknowledged.get(key)
                if sent is not None and sent.attempt == ref.attempt:
                    del self.unacknowledged[key]
        elif not isinstance(decoded, CancelJob):  # a no-op job is through before any cancel
            stats.errors += 1
            log.error("%s: unexpected %s", self.name, type(decoded).__name__)

    def _answer(self, job: JobReady) -> JobFinished | JobFailed | None:
        """As the worker agent's Attempts.receive, for jobs that end at once: a new
        attempt's result; the same result again for a duplicate not yet acknowledged; None
        for a stale attempt. An acknowledged job is forgotten: sent again, it runs again."""
        stats = self.fleet.stats
        key = (job.artifact_id, job.job_id)
        held = self.unacknowledged.get(key)
        if held is not None and held.attempt > job.attempt:
            stats.stale += 1
            return None
        if held is not None and held.attempt == job.attempt:
            stats.duplicates += 1
            return held.result
        result = self._run(job)
        clock = time.monotonic()
        self.unacknowledged[key] = Sent(job.attempt, result, clock)
        previous = self.last_round.get(job.artifact_id)
        if previous is not None and previous[0] == job.iteration - 1:
            stats.turnaround.append(clock - previous[1])
        self.last_round[job.artifact_id] = (job.iteration, clock)
        stats.jobs += 1
        return result

    def _run(self, job: JobReady) -> JobFinished | JobFailed:
        """A no-op job: its inputs read and verified as a worker reads them (a product
        whose bytes do not match its sha256 fails it), its tiny product inline."""
        store = self.fleet.store
        now = time.time()
        try:
            for resource in job.inputs:
                store.get(resource, store.artifact_root(job.artifact_id))
        except Exception as exc:
            self.fleet.stats.failed += 1
            error = RemoteError(type=type(exc).__name__, message=str(exc))
            return JobFailed(job=job.ref, error=error, started_at=now, finished_at=time.time())
        if job.kind == "tasks":  # what TaskRunner.run returns for a task with no files
            task = job.operation.params.get("name")
            data = json.dumps({"task": task, "exit_code": 0, "logs": {}, "outputs": {}}).encode()
        else:
            data = b"null"  # the noop operation's product
        return JobFinished(
            job=job.ref,
            product=store.put_product(job.artifact_id, str(job.job_id), job.attempt, data),
            started_at=now,
            finished_at=time.time(),
            exit_code=0 if job.kind == "tasks" else None,
        )


class Fleet:
    """Simulated workers `{prefix}{i}` on one loop; only the thread calling `step` drives it."""

    def __init__(
        self,
        names: list[str],
        host: str,
        port: int,
        project: str,
        store_url: str,
        resend_interval: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.store = ResourceStore(store_url)  # inline products only: nothing is written
        self.resend_interval = resend_interval
        self.stats = Stats()
        self.ready = 0
        self.stopping = False
        self.workers = [SimWorker(self, name, project) for name in names]
        self._unconnected = list(reversed(self.workers))
        self._selector = selectors.DefaultSelector()
        self._misc_at = self._resend_at = time.monotonic()

    def guard(self, callback: Callable[..., None]) -> Callable[..., None]:
        """A paho callback that logs what it raises: raised, it would end the loop."""

        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception:
                self.stats.errors += 1
                log.exception("error in %s", callback.__qualname__)

        return guarded

    # --- socket callbacks: paho tells the loop what to wait for ----------------------------

    def socket_opened(self, client: mqtt.Client, worker: SimWorker, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._selector.register(sock, selectors.EVENT_READ, worker)

    def socket_closed(self, client: mqtt.Client, worker: SimWorker, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):  # never registered, or fd gone
            self._selector.unregister(sock)

    def want_write(self, client: mqtt.Client, worker: SimWorker, sock: Any) -> None:
        self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, worker)

    def written(self, client: mqtt.Client, worker: SimWorker, sock: Any) -> None:
        self._selector.modify(sock, selectors.EVENT_READ, worker)

    # --- the loop --------------------------------------------------------------------------

    def step(self, timeout: float) -> None:
        """One turn: connect a few more, read and write what the sockets allow, then the
        timers (keepalives, reconnections, re-sends of unacknowledged results)."""
        for _ in range(min(CONNECTS_PER_STEP, len(self._unconnected))):
            self._unconnected.pop().connect()
        if self._selector.get_map():
            events = self._selector.select(timeout)
        else:  # nothing connected (yet): select() with no file would fail on some systems
            time.sleep(timeout)
            events = []
        for key, mask in events:
            client = key.data.client
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        now = time.monotonic()
        if now >= self._misc_at:
            self._misc_at = now + MISC_INTERVAL
            for worker in self.workers:
                worker.client.loop_misc()
                if worker.reconnect_at is not None and now >= worker.reconnect_at:
                    worker.reconnect_at = None
                    worker.connect()
        if now >= self._resend_at:
            self._resend_at = now + self.resend_interval
            for worker in self.workers:
                worker.resend(older_than=self.resend_interval)

    def stop(self, timeout: float = 10.0) -> None:
        """Say offline and disconnect every session, waiting `timeout` s at most."""
        self.stopping = True
        for worker in self.workers:
            if worker.client.is_connected():
                offline = encode(worker.presence(online=False))
                worker.publish(topics.presence(worker.name), offline, "presence", retain=True)
                worker.client.disconnect()
        deadline = time.monotonic() + timeout
        while self._selector.get_map() and time.monotonic() < deadline:
            self.step(0.05)
        for worker in self.workers:
            sock = worker.client.socket()
            if sock is not None:
                sock.close()
        self._selector.close()
