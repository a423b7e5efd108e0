"""The transport over a real MQTT broker: the Bus, the one class driving paho-mqtt.

MQTT v5, QoS 1, persistent sessions; each trap in MQTT-NOTES.md is handled here, once.
With `threaded=False` the node's own thread drives the connection, inside `pump()`.
Speed-ups inside paho are opt-in: `flotta_mqtt.transport.paho_speedups`.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel

from flotta_mqtt.protocol import encode
from flotta_mqtt.transport.base import BusError, ConnectHandler, MessageHandler, Publisher, Will
from flotta_mqtt.transport.settings import BrokerSettings

log = logging.getLogger(__name__)


def _paho_client(
    client_id: str, settings: BrokerSettings, will: Will | None, manual_ack: bool
) -> mqtt.Client:
    """A paho client as `settings` say, MQTT v5, queueing bounded by the Bus's window."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(settings.inflight)
    client.max_queued_messages_set(0)  # the Bus's window bounds the queue
    client.reconnect_delay_set(settings.reconnect_delay_min, settings.reconnect_delay_max)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(
            ca_certs=settings.ca_file,
            certfile=settings.cert_file,
            keyfile=settings.key_file,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if will is not None:
        client.will_set(will.topic, encode(will.message), qos=1, retain=will.retain)
    client.manual_ack_set(manual_ack)
    return client


class Bus(Publisher):
    """A connected MQTT v5 client with a persistent session (unless `clean` is asked for).

    Handlers run on paho's network thread (unthreaded: inside `pump()`), so they must be
    quick and never publish: publishing blocks while the window is full.
    """

    def __init__(
        self,
        client_id: str,
        settings: BrokerSettings,
        on_message: MessageHandler,
        subscriptions: list[str],
        *,
        will: Will | None = None,
        on_connect: ConnectHandler | None = None,
        clean: bool = False,
        threaded: bool = True,
    ) -> None:
        self.client_id = client_id
        self.settings = settings
        self._on_message = on_message
        self._on_connect_hook = on_connect
        self.subscriptions = list(subscriptions)
        self._clean = clean
        self.threaded = threaded
        # Unthreaded: paho is driven by pump() and by publishing threads, one at a time.
        self._io = threading.RLock()
        self._pumping: threading.Thread | None = None  # unthreaded: who calls pump()
        self._started = False  # start() was called: pump() may connect
        self._stopped = False
        self._reconnect_at = 0.0  # unthreaded: when pump() may try to connect again
        self._reconnect_delay = 0.0
        # pump() waits on the socket and on this pair: wake() ends the wait early.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._received: list[tuple[int, int]] = []  # unthreaded: (mid, qos) to acknowledge
        self._withheld = False  # unthreaded: acknowledgements held back (see withhold)
        self._window = threading.BoundedSemaphore(settings.window)
        self._pending: dict[int, str] = {}  # mid → topic, awaiting PUBACK
        self._acked_early: set[int] = set()  # PUBACKed before publish() returned
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self.connected = threading.Event()
        self._first_connack = threading.Event()
        self._refusal: str | None = None
        self._connect_subscription: int | None = None  # mid of the SUBSCRIBE sent on CONNACK
        self._session_present = False

        client = _paho_client(client_id, settings, will, manual_ack=not threaded)
        client.on_socket_open = self._guard(self._socket_open)
        client.on_connect = self._guard(self._connected)
        client.on_disconnect = self._guard(self._disconnected)
        client.on_message = self._guard(self._message)
        client.on_publish = self._guard(self._published)
        client.on_subscribe = self._guard(self._subscribed)
        self._client = client

    # --- lifecycle -------------------------------------------------------------------

    def start(self, wait: float | None = 10.0) -> Bus:
        """Connect in the background; with `wait`, block until the broker answers.

        A node started while the broker is unreachable keeps retrying with backoff. A
        refusal (wrong password, not authorised) raises BusError at once.
        """
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0 if self._clean else self.settings.session_expiry
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive,
            clean_start=self._clean,
            properties=properties,
        )
        if self.threaded:
            self._client.loop_start()
        else:
            self._started = True
            self.wake()  # the pumping thread connects
        if wait is not None:
            if not self._first_connack.wait(wait):
                self.stop()
                raise BusError(f"no answer from the broker at {self.settings.url} in {wait} s")
            if self._refusal is not None:
                self.stop()
                raise BusError(
                    f"the broker at {self.settings.url} refused {self.client_id}: {self._refusal}"
                )
        return self

    def stop(self, goodbye: list[tuple[str, BaseModel, bool]] | None = None) -> None:
        """Publish `goodbye` messages (topic, message, retain), then disconnect once every
        publish so far is acknowledged (waiting 2 s at most).

        A clean DISCONNECT suppresses the last will, so a node says "offline" itself here.
        After `kill()` nothing is published: a crashed node says nothing more.
        """
        if not self._stopped:
            for topic, message, retain in goodbye or []:
                self.publish(topic, message, retain=retain, timeout=2.0)
        # paho drops what is still queued when its loop stops: without this, a workbench
        # that submits and closes at once (`flotta-mqtt submit`) could lose the submission.
        if self.connected.is_set() and not self.flush(timeout=2.0):
            log.warning("%s: publishes not acknowledged before disconnecting", self.client_id)
        with self._io:
            self._stopped = True
            self._client.disconnect()
            self._wake_r.close()
            self._wake_w.close()
        if self.threaded:
            self._client.loop_stop()
        self.connected.clear()

    def kill(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would: the will is sent."""
        with self._io:
            self._stopped = True
            sock = self._client.socket()
            if self.threaded:
                self._client.loop_stop()
            if sock is not None:
                sock.close()
        self.connected.clear()

    # --- driving the connection without a network thread ------------------------------

    def wake(self) -> None:
        """End a `pump()` waiting in another thread (work for its thread has arrived)."""
        with contextlib.suppress(OSError):  # full (already woken) or closed (stopped)
            self._wake_w.send(b"!")

    def acknowledge(self) -> None:
        """Unthreaded: tell the broker that what was received so far is handled (unless
        acknowledgements are withheld)."""
        if not self._received or self._withheld:  # called once per loop: most often nothing
            return
        with self._io:
            received, self._received = self._received, []
            for mid, qos in received:
                self._client.ack(mid, qos)

    def withhold(self, held: bool) -> None:
        """Unthreaded: hold back every acknowledgement (True), from `pump()` and
        `acknowledge()` alike, until what was received is durable (False): a message the
        node handles after the pump that read it is delivered again if the node goes away
        first. All are held, so acknowledgements still go in the order received."""
        self._withheld = held

    def pump(self, timeout: float) -> None:
        """Unthreaded: wait up to `timeout` s for traffic, hand what arrived to the
        handlers, send what is due (pings, acknowledgements) and reconnect with backoff.

        Called over and over by one thread at a time, at least every keepalive/2 seconds;
        returns early when messages arrived or `wake()` was called.
        """
        self._pumping = threading.current_thread()
        if self._stopped:  # nothing to drive any more; the caller is about to stop too
            time.sleep(min(timeout, 0.1))
            return
        self.acknowledge()  # whatever the node did not acknowledge itself
        sock = self._client.socket()
        if sock is None:
            self._connect_if_due()
            sock = self._client.socket()
        waiting: list[Any] = [self._wake_r] if sock is None else [self._wake_r, sock]
        if sock is None and self._started:
            timeout = min(timeout, max(0.0, self._reconnect_at - time.monotonic()))
        writing = [sock] if sock is not None and self._client.want_write() else []
        try:
            readable, writable, _ = select.select(waiting, writing, [], max(0.0, timeout))
        except (OSError, ValueError):  # the socket closed under us: reconnect next time
            return
        with self._io:
            if self._stopped:
                return
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            if sock is None or self._client.socket() is not sock:
                return
            if sock in readable:
                self._read_all(sock)
            if self._client.socket() is sock and (sock in writable or self._client.want_write()):
                self._lost(self._client.loop_write())
            if self._client.socket() is sock:
                self._lost(self._client.loop_misc())

    def _read_all(self, sock: Any, most: int = 1000) -> None:
        """Read every packet already received (up to `most`): one burst for the handler."""
        for _ in range(most):
            if self._lost(self._client.loop_read()):
                return
            current = self._client.socket()
            if current is None or current is not sock:
                return
            pending = current.pending() if isinstance(current, ssl.SSLSocket) else 0
            if not pending and not select.select([current], [], [], 0)[0]:
                return

    def _lost(self, rc: MQTTErrorCode) -> bool:
        """Whether paho just lost the connection (it closed the socket): retry after backoff."""
        if rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            return False
        self._schedule_reconnect()
        return True

    def _schedule_reconnect(self) -> None:
        low, high = self.settings.reconnect_delay_min, self.settings.reconnect_delay_max
        self._reconnect_delay = min(high, max(low, self._reconnect_delay * 2))
        self._reconnect_at = time.monotonic() + self._reconnect_delay

    def _connect_if_due(self) -> None:
        if not self._started or self._stopped or time.monotonic() < self._reconnect_at:
            return
        with self._io:
            try:
                self._client.reconnect()  # blocks for the TCP connect: the broker's address
            except (OSError, ValueError) as exc:
                log.warning("%s: cannot reach the broker: %s", self.client_id, exc)
                self._schedule_reconnect()

    def subscribe(self, topic: str) -> None:
        """Add a subscription now and on every reconnect."""
        with self._lock:
            if topic in self.subscriptions:
                return
            self.subscriptions.append(topic)
        with self._io:
            self._client.subscribe(topic, options=SubscribeOptions(qos=1))

    # --- publishing --------------------------------------------------------------------

    def publish_raw(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 60.0
    ) -> None:
        """Publish bytes as they are (tests use it to send malformed messages)."""
        self.check_payload(topic, payload)
        if not self._wait_for_room(timeout):
            raise BusError(f"{self.settings.window} publishes unacknowledged for {timeout} s")
        with self._io:  # unthreaded, paho writes the packet from here at once
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if not self.threaded and self._client.want_write():
                self.wake()  # not all written: the pumping thread waits for the socket
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._window.release()
            raise BusError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        # paho may deliver the PUBACK before publish() returns; whichever side comes
        # second settles the window slot.
        with self._lock:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
                self._window.release()
            else:
                self._pending[info.mid] = topic

    def _wait_for_room(self, timeout: float) -> bool:
        """Take a slot in the window (freed by the broker's acknowledgements)."""
        if self.threaded or self._pumped_elsewhere():
            return self._window.acquire(timeout=timeout)
        return self._pump_until(lambda: self._window.acquire(blocking=False), timeout)

    def _pumped_elsewhere(self) -> bool:
        """Whether another live thread pumped this unthreaded bus last, and so drives it:
        waiting is then enough."""
        pumping = self._pumping
        current = threading.current_thread()
        return pumping is not None and pumping is not current and pumping.is_alive()

    def _pump_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Unthreaded, with nobody else pumping: pump until `done()`, or False at `timeout`
        (what the caller waits for comes in through this thread alone)."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() >= deadline:
                return False
            self.pump(min(0.05, deadline - time.monotonic()))
        return True

    @property
    def unacknowledged(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every publish so far is acknowledged by the broker."""
        if self.threaded or self._pumped_elsewhere():
            with self._settled:
                return self._settled.wait_for(lambda: not self._pending, timeout)
        return self._pump_until(lambda: not self.unacknowledged, timeout)

    # --- paho callbacks (network thread) ---------------------------------------------

    def _guard(self, callback: Callable[..., None]) -> Callable[..., None]:
        def guarded(*args: Any) -> None:
            self._callback_thread = threading.get_ident()
            try:
                callback(*args)
            except Exception:
                log.exception(
                    "%s: error in %s (network thread kept alive)", self.client_id, callback.__name__
                )
            finally:
                self._callback_thread = None

        return guarded

    def _socket_open(self, _: Any, __: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # paho's VERSION2 signatures: (client, userdata, …, properties), unused ones as `_`.

    def _connected(
        self, client: mqtt.Client, _: Any, flags: Any, reason: ReasonCode, __: Any
    ) -> None:
        if reason.is_failure:
            self._refusal = str(reason)
            log.error("%s: broker refused the connection: %s", self.client_id, reason)
            self._first_connack.set()
            return
        self._refusal = None
        self._reconnect_delay = 0.0  # a later loss retries after the shortest delay again
        if self.subscriptions:
            options = SubscribeOptions(qos=1)
            with self._lock:
                wanted = [(topic, options) for topic in self.subscriptions]
            self._session_present = flags.session_present
            _, self._connect_subscription = client.subscribe(wanted)
        else:
            self._ready(flags.session_present)

    def _subscribed(self, _: Any, __: Any, mid: int, reasons: list[Any], ___: Any) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.error("%s: a subscription was refused: %s", self.client_id, reason)
        if mid == self._connect_subscription:
            self._ready(self._session_present)

    def _ready(self, session_present: bool) -> None:
        self.connected.set()
        self._first_connack.set()
        if self._on_connect_hook is not None:
            self._on_connect_hook(session_present)

    def _disconnected(self, _: Any, __: Any, ___: Any, reason: ReasonCode, ____: Any) -> None:
        self.connected.clear()
        self._received.clear()  # ids of the lost session: the broker re-delivers those
        if reason.is_failure:
            log.warning("%s: disconnected from the broker: %s", self.client_id, reason)

    def _message(self, _: Any, __: Any, message: mqtt.MQTTMessage) -> None:
        if not self.threaded and message.qos > 0:
            self._received.append((message.mid, message.qos))  # even if the handler fails
        self._on_message(message.topic, bytes(message.payload))

    def _published(self, _: Any, __: Any, mid: int, reason: ReasonCode, ___: Any) -> None:
        with self._lock:
            topic = self._pending.pop(mid, None)
            if topic is None:
                self._acked_early.add(mid)
                return
            self._settled.notify_all()
        self._window.release()
        if reason.is_failure:
            log.error("%s: the broker refused a message on %s: %s", self.client_id, topic, reason)
