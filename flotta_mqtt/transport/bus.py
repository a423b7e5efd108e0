"""The transport over a real MQTT broker: the Bus, the one class driving paho-mqtt.

MQTT v5, QoS 1, persistent sessions; each trap in MQTT-NOTES.md is handled here, once.
With `threaded=False` the node's own thread drives the connection, inside `pump()`
(transport/pumping.py). One process per identity: the claim (transport/claims.py) is
checked before each connection.
Speed-ups inside paho are opt-in: `flotta_mqtt.transport.paho_speedups`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel

from flotta_mqtt.transport.base import (
    BrokerRefused,
    BusError,
    ConnectHandler,
    FailureHandler,
    MessageHandler,
    Publisher,
    Will,
)
from flotta_mqtt.transport.claims import SESSION_TAKEN_OVER, Claim
from flotta_mqtt.transport.pumping import Pumping
from flotta_mqtt.transport.settings import BrokerSettings
from flotta_mqtt.transport.window import Window

log = logging.getLogger(__name__)


class _NotNow(OSError):
    """Raised before a connection attempt that must not be made (paho counts it failed)."""


def _paho_client(
    client_id: str,
    settings: BrokerSettings,
    will: tuple[str, bytes, bool] | None,
    manual_ack: bool,
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
        topic, payload, retain = will
        client.will_set(topic, payload, qos=1, retain=retain)
    client.manual_ack_set(manual_ack)
    return client


class Bus(Pumping, Publisher):
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
        on_failure: FailureHandler | None = None,
        clean: bool = False,
        threaded: bool = True,
        claim: bool = True,
        once: bool = False,
    ) -> None:
        self.client_id = client_id
        self.settings = settings
        self._on_message = on_message
        self._on_connect_hook = on_connect
        self.subscriptions = [self.outward(topic) for topic in subscriptions]
        self._clean = clean
        self.threaded = threaded
        self._io = threading.RLock()  # the attributes of the unthreaded half: pumping.py
        self._pumping = None
        self._started = False
        self._stopped = False
        self._reconnect_at = self._reconnect_delay = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._received = []
        self._withheld = False
        self._window = Window(settings.window)
        self._lock = threading.Lock()  # guards the subscriptions
        self.connected = threading.Event()
        self._first_connack = threading.Event()
        self._once = once  # a probe's: one connection attempt, start() fails at once after it
        self._unreached = False
        self._refusal: str | None = None
        self._connect_subscription: int | None = None  # mid of the SUBSCRIBE sent on CONNACK
        self._session_present = False

        # A probe's own bus (claim=False) claims nothing, and so probes nothing either.
        self._claim = Claim(client_id, settings, will, Bus if claim else None, on_failure)
        client = _paho_client(client_id, settings, self.last_will(), not threaded)
        if threaded:  # unthreaded, pump() asks the claim before connecting
            client.on_pre_connect = self._pre_connect  # unguarded: what it raises stops paho
        client.on_connect_fail = self._guard(self._connect_failed)
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
        refusal (wrong password, not authorised) raises BrokerRefused at once, another
        process holding the identity IdentityInUse.
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
        self._claim.keep(lambda: self._publish_claim(self._claim.message), self.connected)
        if wait is not None:
            if not self._first_connack.wait(wait) or self._unreached:
                self.stop()
                raise BusError(f"no answer from the broker at {self.settings.url} in {wait} s")
            if self._claim.failure is not None:
                self.stop()
                raise self._claim.failure
            if self._refusal is not None:
                self.stop()
                raise BrokerRefused(
                    f"the broker at {self.settings.url} refused {self.client_id}: {self._refusal}"
                )
        return self

    def stop(self, goodbye: list[tuple[str, BaseModel, bool]] | None = None) -> None:
        """Publish `goodbye` messages (topic, message, retain), then disconnect once every
        publish so far is acknowledged (waiting 2 s at most).

        A clean DISCONNECT suppresses the last will, so a node says "offline" itself here,
        and clears its claim. After `kill()` (or giving up) nothing is published.
        """
        self._claim.release()
        if not self._stopped:
            for topic, message, retain in goodbye or []:
                self.publish(topic, message, retain=retain, timeout=2.0)
            if self._claim.claiming:  # QoS 0 as every claim: waiting would pump, and acknowledge
                self._publish_claim(b"")
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
        self._claim.release()
        with self._io:
            self._stopped = True
            sock = self._client.socket()
            if self.threaded:
                self._client.loop_stop()
            if sock is not None:
                sock.close()
        self.connected.clear()

    def _lost(self, rc: MQTTErrorCode) -> bool:
        """Whether paho just lost the connection (it closed the socket): retry after backoff."""
        if rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            return False
        self._schedule_reconnect()
        return True

    def _pre_connect(self, _: Any, __: Any) -> None:
        """Threaded, paho before each connection attempt: the claim's probe first."""
        if not self._admitted():
            raise _NotNow(f"{self.client_id}: not connecting now")

    def _admitted(self) -> bool:
        """Whether the claim lets a connection attempt go now (see claims.py)."""
        if self._claim.admit():
            return True
        if self._claim.failure is not None:
            self._give_up()
        return False

    def _give_up(self) -> None:
        """The claim gave up for good: no more connections; whoever waits in start() wakes."""
        self._stopped = True
        self.connected.clear()
        self._first_connack.set()
        with self._io:
            self._client.disconnect()  # no socket now: paho's loop ends, never reconnects

    def subscribe(self, topic: str) -> None:
        """Add a subscription now and on every reconnect."""
        topic = self.outward(topic)
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
        topic = self.outward(topic)
        self.check_payload(topic, payload)
        if not self._wait_for_room(timeout):
            raise BusError(f"{self.settings.window} publishes unacknowledged for {timeout} s")
        with self._io:  # unthreaded, paho writes the packet from here at once
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if not self.threaded and self._client.want_write():
                self.wake()  # not all written: the pumping thread waits for the socket
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._window.give_back()
            raise BusError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        self._window.sent(info.mid, topic)

    def _wait_for_room(self, timeout: float) -> bool:
        """Take a slot in the window (freed by the broker's acknowledgements)."""
        if self.threaded or self._pumped_elsewhere():
            return self._window.take(timeout)
        return self._pump_until(lambda: self._window.take(0), timeout)

    @property
    def unacknowledged(self) -> int:
        return self._window.unacknowledged

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every publish so far is acknowledged by the broker."""
        if self.threaded or self._pumped_elsewhere():
            return self._window.settled(timeout)
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
        self._claim.began()
        if self._claim.claiming:
            self._publish_claim(self._claim.message)
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
        if not self._stopped:  # not asked for: the session may have been taken over
            self._claim.ended(taken_over=reason.value == SESSION_TAKEN_OVER)
            if self._claim.failure is not None:
                self._give_up()

    def _connect_failed(self, _: Any, __: Any) -> None:
        self._claim.unreachable()
        if self._once:  # no retrying: paho's loop ends, start() raises
            self._unreached = True
            self._first_connack.set()
            self._client.disconnect()

    def _publish_claim(self, payload: bytes) -> None:
        """Claim the identity (QoS 0, retained, expiring) at each CONNACK and every keepalive;
        clear the claim (an empty `payload`) on stopping."""
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.MessageExpiryInterval = self._claim.expiry
        with self._io:
            topic = self.outward(self._claim.topic)
            self._client.publish(topic, payload, qos=0, retain=True, properties=properties)
            if not self.threaded and self._client.want_write():
                self.wake()

    def _message(self, _: Any, __: Any, message: mqtt.MQTTMessage) -> None:
        if not self.threaded and message.qos > 0:
            self._received.append((message.mid, message.qos))  # even if the handler fails
        self._on_message(self.inward(message.topic), bytes(message.payload))

    def _published(self, _: Any, __: Any, mid: int, reason: ReasonCode, ___: Any) -> None:
        topic = self._window.acknowledged(mid)
        if topic is not None and reason.is_failure:
            log.error("%s: the broker refused a message on %s: %s", self.client_id, topic, reason)
