"""The in-memory MQTT broker behind `memory://NAME` URLs, for MemoryBus (memory.py).

mosquitto's rules, with no process and no timing: every message QoS 1, what a connection
was sent and did not acknowledge sent again (first) to its session's next connection,
retained messages (an empty one clears), sessions that outlive a disconnect unless clean,
wills, takeover by client id, one copy per matching subscription (as mosquitto v5).
Not modelled: expiry (a session with an expiry > 0 lasts as long as its broker),
keepalive, `$share` subscriptions, passwords.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flotta_mqtt.transport.settings import BrokerSettings

__all__ = [
    "Acl",
    "Connection",
    "Delivery",
    "MemoryBroker",
    "Message",
    "Ready",
    "fresh_memory_broker",
    "memory_broker",
    "topic_matches",
]

log = logging.getLogger(__name__)

Acl = Callable[[str, str, str], bool]  # (client id, "read" or "write", topic) → allowed


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether an MQTT topic filter (`+`: one level, `#`: the rest) matches a topic."""
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False  # wildcards at the root never match $SYS and the like
    wanted, levels = pattern.split("/"), topic.split("/")
    for depth, part in enumerate(wanted):
        if part == "#":
            return True  # the parent level too: `a/#` matches `a`
        if depth >= len(levels) or part not in ("+", levels[depth]):
            return False
    return len(wanted) == len(levels)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class Delivery:
    connection: Connection
    mid: int  # what the connection acknowledges it with
    message: Message


@dataclass(frozen=True)
class Ready:
    """The CONNACK and SUBACK: what was in flight or queued comes before, what is retained
    after (as from mosquitto)."""

    connection: Connection
    session_present: bool


class Connection:
    """One connection of a client: what the broker sends waits in `inbox` (guarded by
    `arrived`, the bus's) until the bus hands it over. Once lost, it gets nothing more and
    its acknowledgements are void: the session sends the unacknowledged to the next one."""

    def __init__(
        self,
        client_id: str,
        subscriptions: Sequence[str],
        connected: threading.Event,
        arrived: threading.Condition,
    ) -> None:
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.connected = connected
        self.arrived = arrived
        self.inbox: deque[Delivery | Ready] = deque()
        self.lost = False
        self.taken_over = False  # lost to another connection of the same client id

    def post(self, item: Delivery | Ready) -> None:
        with self.arrived:
            self.inbox.append(item)
            self.arrived.notify_all()

    def take(self) -> list[Delivery | Ready]:
        with self.arrived:
            taken = list(self.inbox)
            self.inbox.clear()
            return taken

    def lose(self) -> None:
        with self.arrived:
            self.lost = True
            self.connected.clear()
            self.inbox.clear()
            self.arrived.notify_all()


@dataclass
class _Session:
    subscriptions: list[str]
    keep: bool  # outlives a disconnect: clean start off and an expiry
    connection: Connection | None = None
    will: Message | None = None
    queued: deque[Message] = field(default_factory=deque)  # arrived while away
    unacknowledged: dict[int, Message] = field(default_factory=dict)  # sent, in order
    mids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


class MemoryBroker:
    """The broker of one `memory://NAME`: sessions by client id and retained messages.

    `acl`, when set, decides every publish ("write": a refused one is logged and dropped,
    as mosquitto does) and every delivery ("read": mosquitto filters at delivery).
    `changed` guards all state, and is notified when a connection comes up.
    """

    def __init__(self, name: str, acl: Acl | None = None) -> None:
        self.name = name
        self.acl = acl
        self.changed = threading.Condition()  # re-entrant: a bus holds it to call in
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, bytes] = {}

    @property
    def url(self) -> str:
        return f"memory://{self.name}"

    def broker_settings(self, **fields: object) -> BrokerSettings:
        """Settings for a node of this broker (`fields` as BrokerSettings takes them)."""
        return BrokerSettings.model_validate({**fields, "url": self.url})

    def close(self) -> None:
        """Drop every connection, session and retained message, and free the name (the
        buses' delivery threads end with their connections): a test fixture's last step."""
        with self.changed:
            for session in self._sessions.values():
                if session.connection is not None:
                    session.connection.lose()
            self._sessions.clear()
            self._retained.clear()
        with _registry_lock:
            if _brokers.get(self.name) is self:
                del _brokers[self.name]

    def connect(
        self,
        connection: Connection,
        *,
        will: Message | None,
        clean: bool,
        keep: bool,
        outbox: list[Message],
    ) -> None:
        """Attach a connection to its client's session (taking it over from another), send
        it what is due, then publish (and empty) `outbox`, what its client queued."""
        client_id = connection.client_id
        with self.changed:
            session = self._sessions.get(client_id)
            if session is not None and session.connection is not None:  # taken over
                if clean or not session.keep:  # when mosquitto sends the old will
                    self._publish_will(client_id, session)
                session.connection.taken_over = True
                session.connection.lose()
            if session is not None and (clean or not session.keep):
                session = None
            present = session is not None
            if session is None:
                session = self._sessions[client_id] = _Session([], keep)
            session.keep, session.will, session.connection = keep, will, connection
            session.subscriptions += [
                s for s in connection.subscriptions if s not in session.subscriptions
            ]
            for mid, message in session.unacknowledged.items():
                connection.post(Delivery(connection, mid, message))
            while session.queued:
                self._send(session, session.queued.popleft())
            connection.post(Ready(connection, present))
            for pattern in connection.subscriptions:
                self._send_retained(client_id, session, pattern)
            for message in outbox:
                self.publish(client_id, message)
            outbox.clear()
            self.changed.notify_all()

    def disconnect(self, connection: Connection, send_will: bool) -> None:
        """End a connection (a kill sends the will); a kept session waits for the next."""
        client_id = connection.client_id
        with self.changed:
            session = self._sessions.get(client_id)
            if session is None or session.connection is not connection:  # lost already
                return
            connection.lose()
            session.connection = None
            if send_will:
                self._publish_will(client_id, session)
            session.will = None
            if not session.keep:
                del self._sessions[client_id]

    def subscribe(self, connection: Connection, pattern: str) -> None:
        with self.changed:
            session = self._sessions.get(connection.client_id)
            if session is None or session.connection is not connection:
                return
            if pattern not in session.subscriptions:
                session.subscriptions.append(pattern)
            self._send_retained(connection.client_id, session, pattern)

    def acknowledge(self, connection: Connection, mids: Sequence[int]) -> None:
        with self.changed:
            session = self._sessions.get(connection.client_id)
            if session is not None and session.connection is connection:
                for mid in mids:
                    session.unacknowledged.pop(mid, None)

    def publish(self, client_id: str, message: Message) -> None:
        """Retain (or clear) it, then send one copy per matching subscription."""
        with self.changed:
            if self.acl is not None and not self.acl(client_id, "write", message.topic):
                log.error("%s: the broker refused a message on %s", client_id, message.topic)
                return
            if message.retain and message.payload:
                self._retained[message.topic] = message.payload
            elif message.retain:
                self._retained.pop(message.topic, None)
            delivered = Message(message.topic, message.payload)
            for subscriber, session in self._sessions.items():
                if self._readable(subscriber, message.topic):
                    for pattern in session.subscriptions:
                        if topic_matches(pattern, message.topic):
                            self._send(session, delivered)

    def _send(self, session: _Session, message: Message) -> None:
        if session.connection is None:
            session.queued.append(message)
            return
        mid = next(session.mids)
        session.unacknowledged[mid] = message
        session.connection.post(Delivery(session.connection, mid, message))

    def _send_retained(self, client_id: str, session: _Session, pattern: str) -> None:
        for topic, payload in self._retained.items():
            if topic_matches(pattern, topic) and self._readable(client_id, topic):
                self._send(session, Message(topic, payload))

    def _readable(self, client_id: str, topic: str) -> bool:
        return self.acl is None or self.acl(client_id, "read", topic)

    def _publish_will(self, client_id: str, session: _Session) -> None:
        if session.will is not None:
            self.publish(client_id, session.will)


_brokers: dict[str, MemoryBroker] = {}
_registry_lock = threading.Lock()
_numbers = itertools.count(1)


def memory_broker(name: str) -> MemoryBroker:
    """The broker `memory://NAME` means in this process, made on first use."""
    with _registry_lock:
        if name not in _brokers:
            _brokers[name] = MemoryBroker(name)
        return _brokers[name]


def fresh_memory_broker(prefix: str = "test") -> MemoryBroker:
    """A new broker under a name not used before in this process (one per test)."""
    with _registry_lock:
        name = next(f"{prefix}-{n}" for n in _numbers if f"{prefix}-{n}" not in _brokers)
        broker = _brokers[name] = MemoryBroker(name)
        return broker
