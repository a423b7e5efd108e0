"""What every part needs of the bus: the transport protocol, whichever broker is behind it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

from pydantic import BaseModel

from flotta_mqtt.protocol import MAX_MESSAGE_BYTES, encode, encode_batches, topics
from flotta_mqtt.transport.settings import BrokerSettings

if TYPE_CHECKING:  # claims.py builds on this module
    from flotta_mqtt.transport.claims import Claim

MessageHandler = Callable[[str, bytes], None]
ConnectHandler = Callable[[bool], None]  # called with session_present after each CONNACK


class BusError(RuntimeError):
    """The bus cannot do what was asked: refused connection, full window, broker error."""


class BrokerRefused(BusError):
    """The broker answered the connection with a refusal: bad password, not authorised."""


class IdentityInUse(BusError):
    """Another live process holds this broker identity: the bus stopped, or never started."""


FailureHandler = Callable[[BusError], None]  # called once, when the bus gives up for good


@dataclass
class Will:
    """What the broker publishes for this node if it vanishes without saying goodbye."""

    topic: str
    message: BaseModel
    retain: bool = True


class Publisher:
    """What every bus does alike: protocol messages become payloads, a burst of them for
    one topic as few batches as the size limit allows, and no payload leaves that the
    broker would refuse, that a handler sends, or that a bus which gave up would queue;
    the claim on its identity (transport/claims.py) is checked the same way."""

    _callback_thread: int | None = None  # the thread inside a message handler now
    _claim: Claim
    settings: BrokerSettings

    def outward(self, topic: str) -> str:
        """A protocol topic as this connection's group spells it on the broker."""
        return topics.to_group(topic, self.settings.group)

    def inward(self, topic: str) -> str:
        """A topic received, as the protocol spells it (its group's namespace removed)."""
        return topics.from_group(topic, self.settings.group)

    def last_will(self) -> tuple[str, bytes, bool] | None:
        """(topic, payload, retain) the claim connects with, its topic in this group."""
        will = self._claim.last_will
        return None if will is None else (self.outward(will[0]), will[1], will[2])

    @property
    def failure(self) -> BusError | None:
        """Why the bus gave up for good (IdentityInUse), or None while it serves."""
        return self._claim.failure

    def check(self) -> None:
        """Raise IdentityInUse if another live process holds this bus's identity now: a
        node calls it before touching its state (the bus checks again when connecting)."""
        self._claim.check()

    def publish(
        self, topic: str, message: BaseModel, *, retain: bool = False, timeout: float = 60.0
    ) -> None:
        """Publish a protocol message at QoS 1 (queued while disconnected)."""
        self.publish_raw(topic, encode(message), retain=retain, timeout=timeout)

    def publish_many(self, topic: str, messages: Sequence[BaseModel]) -> None:
        """Publish messages for one topic in as few payloads as the size limit allows
        (JobReady batched as JobBatch, worker events as EventBatch)."""
        for payload in encode_batches(messages):
            self.publish_raw(topic, payload)

    def publish_raw(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 60.0
    ) -> None:
        raise NotImplementedError

    def check_payload(self, topic: str, payload: bytes) -> None:
        """Refuse a payload over the broker's limit (a v5 QoS 1 publish past it gets a
        PUBACK paho cannot parse, and it reconnects and re-sends forever), a publish from
        inside a handler (it may wait for the window the handler holds up), and any once
        the bus gave up."""
        if self._claim.failure is not None:
            raise self._claim.failure
        if len(payload) > MAX_MESSAGE_BYTES:
            raise BusError(f"{len(payload)} bytes to {topic}: over {MAX_MESSAGE_BYTES}")
        if threading.get_ident() == self._callback_thread:
            raise BusError("publish() called from a bus callback: hand the work to a thread")


class Transport(Protocol):
    """A node's connection to the broker: QoS 1 publishes, subscriptions, a persistent
    session (unless clean), a last will, and acknowledgements the node may control.

    Messages reach `on_message(topic, payload)` on the thread that drives the connection:
    the transport's own thread, or with `threaded=False` the node's thread inside `pump()`.
    One process per identity: `check()` and every connection refuse (IdentityInUse) while
    another live process holds the client id, and a session taken over is not taken back
    (transport/claims.py).
    """

    client_id: str
    connected: threading.Event

    @property
    def failure(self) -> BusError | None:
        """Why the bus gave up for good (IdentityInUse), or None while it serves."""
        ...

    def check(self) -> None: ...

    def start(self, wait: float | None = 10.0) -> Self: ...

    def stop(self, goodbye: list[tuple[str, BaseModel, bool]] | None = None) -> None: ...

    def kill(self) -> None: ...

    def subscribe(self, topic: str) -> None: ...

    def publish(
        self, topic: str, message: BaseModel, *, retain: bool = False, timeout: float = 60.0
    ) -> None: ...

    def publish_many(self, topic: str, messages: Sequence[BaseModel]) -> None: ...

    def publish_raw(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 60.0
    ) -> None: ...

    def flush(self, timeout: float = 10.0) -> bool: ...

    def pump(self, timeout: float) -> None: ...

    def wake(self) -> None: ...

    def acknowledge(self) -> None: ...

    def withhold(self, held: bool) -> None: ...
