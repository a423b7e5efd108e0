"""The transport in memory: MemoryBus, a node's connection to a `memory://NAME` broker.

It keeps the paho Bus's rules, so that the roles' unit tests run against what the broker
will do (see memory_broker.py for what the broker models and what it does not), the claim
on its identity included (transport/claims.py; nothing expires here). A bus killed stays
down until `start()`: nothing reconnects by itself; one taken over gives up for good.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from pydantic import BaseModel

from flotta_mqtt.transport.base import (
    BusError,
    ConnectHandler,
    FailureHandler,
    MessageHandler,
    Publisher,
    Will,
)
from flotta_mqtt.transport.claims import Claim
from flotta_mqtt.transport.memory_broker import (
    Connection,
    Delivery,
    MemoryBroker,
    Message,
    Ready,
    fresh_memory_broker,
    memory_broker,
)
from flotta_mqtt.transport.settings import BrokerSettings

__all__ = ["MemoryBroker", "MemoryBus", "fresh_memory_broker", "memory_broker"]

log = logging.getLogger(__name__)


class MemoryBus(Publisher):
    """A connection to a MemoryBroker with the Bus's rules: handlers run on the bus's
    delivery thread (or, with `threaded=False`, inside `pump()` on the node's thread) and
    may not publish; a message is acknowledged once its handler returned (unthreaded: at
    `acknowledge()` or the next `pump()`, unless withheld)."""

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
        once: bool = False,  # connecting here never fails: nothing to try again
    ) -> None:
        self.client_id = client_id
        self.settings = settings
        self.subscriptions = [self.outward(topic) for topic in subscriptions]
        self.threaded = threaded
        self.connected = threading.Event()
        self._broker = memory_broker(urlsplit(settings.url).netloc)
        self._on_message = on_message
        self._on_connect = on_connect
        self._claim = Claim(client_id, settings, will, MemoryBus if claim else None, on_failure)
        last_will = self.last_will()
        self._will = None if last_will is None else Message(*last_will)
        self._clean = clean
        self._connection: Connection | None = None
        self._outbox: list[Message] = []  # published while down (guarded by the broker)
        self._arrived = threading.Condition()  # guards the connections' inboxes and _woken
        self._woken = False
        self._received: list[tuple[Connection, int]] = []  # unthreaded: to acknowledge
        self._withheld = False
        self._first_ready = threading.Event()
        self._delivering: threading.Thread | None = None
        self._stopped = False

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, wait: float | None = 10.0) -> MemoryBus:
        """Connect; with `wait`, block until connected (unthreaded: once a pump ran).
        Another process holding the identity: IdentityInUse (with no `wait`, the failure
        handler hears it)."""
        if not self._claim.admit():
            self._stopped = True
            if wait is not None and self._claim.failure is not None:
                raise self._claim.failure
            return self
        self._stopped = False
        connection = Connection(self.client_id, self.subscriptions, self.connected, self._arrived)
        keep = not self._clean and self.settings.session_expiry > 0
        with self._broker.changed:
            self._connection = connection
            self._broker.connect(
                connection, will=self._will, clean=self._clean, keep=keep, outbox=self._outbox
            )
            if self._claim.claiming:
                claim = Message(self.outward(self._claim.topic), self._claim.message, retain=True)
                self._broker.publish(self.client_id, claim)
        if self.threaded:
            self._delivering = threading.Thread(
                target=self._deliver, args=(connection,), name=f"bus-{self.client_id}", daemon=True
            )
            self._delivering.start()
        if wait is not None and not self._first_ready.wait(wait):
            self.stop()
            raise BusError(f"no answer from the broker at {self.settings.url} in {wait} s")
        return self

    def stop(self, goodbye: list[tuple[str, BaseModel, bool]] | None = None) -> None:
        """Publish `goodbye` (topic, message, retain), clear the claim, then disconnect:
        no will."""
        if not self._stopped:
            for topic, message, retain in goodbye or []:
                self.publish(topic, message, retain=retain, timeout=2.0)
            if self._claim.claiming:
                self.publish_raw(self._claim.topic, b"", retain=True, timeout=2.0)
        self._go_away(send_will=False)

    def kill(self) -> None:
        """Vanish as a crash would: the will is published, nothing else."""
        self._go_away(send_will=True)

    def _go_away(self, send_will: bool) -> None:
        self._stopped = True
        with self._broker.changed:
            if self._connection is not None:
                self._broker.disconnect(self._connection, send_will)
            self._outbox.clear()  # paho drops what it had queued as well
        thread, self._delivering = self._delivering, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.wake()

    def subscribe(self, topic: str) -> None:
        """Add a subscription now and on every reconnect."""
        topic = self.outward(topic)
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
            if self._connection is not None:
                self._broker.subscribe(self._connection, topic)

    # --- publishing --------------------------------------------------------------------

    def publish_raw(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 60.0
    ) -> None:
        """Publish bytes as they are; while disconnected, wait for room in the window."""
        topic = self.outward(topic)
        self.check_payload(topic, payload)
        window = self.settings.window
        with self._broker.changed:
            if not self._broker.changed.wait_for(
                lambda: self._online() or len(self._outbox) < window, timeout
            ):
                raise BusError(f"{window} publishes unacknowledged for {timeout} s")
            if self._online():
                self._broker.publish(self.client_id, Message(topic, payload, retain))
            else:
                self._outbox.append(Message(topic, payload, retain))

    def _online(self) -> bool:
        return self._connection is not None and not self._connection.lost

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every publish so far reached the broker (at once when connected)."""
        with self._broker.changed:
            return self._broker.changed.wait_for(lambda: not self._outbox, timeout)

    # --- deliveries --------------------------------------------------------------------

    def _deliver(self, connection: Connection) -> None:
        """Threaded: hand over what arrives, one at a time, until the connection is lost."""
        while True:
            with self._arrived:
                self._arrived.wait_for(lambda: connection.inbox or connection.lost)
                if connection.lost:
                    break
                item = connection.inbox.popleft()
            self._hand_over(item)
        self._lost(connection)

    def _lost(self, connection: Connection) -> None:
        """A connection ended: if another took the session over, give up (the broker
        said so, as mosquitto does from 2.0.15 with DISCONNECT 0x8E)."""
        if connection.taken_over and not self._stopped:
            self._stopped = True
            self._claim.ended(taken_over=True)

    def pump(self, timeout: float) -> None:
        """Unthreaded: acknowledge what is due, wait up to `timeout` s (0.1 s once stopped,
        as the Bus) for deliveries or `wake()`, and hand them to the handlers here."""
        self.acknowledge()
        if self._connection is not None and self._connection.lost:
            self._lost(self._connection)
        with self._arrived:
            self._arrived.wait_for(
                lambda: self._woken or self._deliverable() is not None,
                min(timeout, 0.1) if self._stopped else timeout,
            )
            self._woken = False
            connection = self._deliverable()
            burst = connection.take() if connection is not None else []
        for item in burst:
            self._hand_over(item)

    def _deliverable(self) -> Connection | None:
        """Unthreaded: the connection now, if deliveries wait in it (the current one is
        read each time: a pump may begin before `start()`)."""
        connection = self._connection
        if self.threaded or connection is None or not connection.inbox:
            return None
        return connection

    def wake(self) -> None:
        """End a `pump()` waiting in another thread."""
        with self._arrived:
            self._woken = True
            self._arrived.notify_all()

    def acknowledge(self) -> None:
        """Unthreaded: what was received so far is handled (unless withheld)."""
        if not self._received or self._withheld:
            return
        with self._arrived:
            received, self._received = self._received, []
        for connection in dict.fromkeys(connection for connection, _ in received):
            mids = [mid for sent_to, mid in received if sent_to is connection]
            self._broker.acknowledge(connection, mids)

    def withhold(self, held: bool) -> None:
        """Unthreaded: hold back every acknowledgement (True) until released (False)."""
        self._withheld = held

    def _hand_over(self, item: Delivery | Ready) -> None:
        if isinstance(item, Ready):
            with self._arrived:  # not after the connection was lost meanwhile
                if item.connection.lost:
                    return
                self.connected.set()
            self._first_ready.set()
            if self._on_connect is not None:
                self._guarded(self._on_connect, item.session_present)
            return
        if not self.threaded:
            with self._arrived:
                self._received.append((item.connection, item.mid))  # even if the handler fails
        self._guarded(self._on_message, self.inward(item.message.topic), item.message.payload)
        if self.threaded:
            self._broker.acknowledge(item.connection, [item.mid])

    def _guarded(self, handler: Callable[..., None], *args: object) -> None:
        self._callback_thread = threading.get_ident()
        try:
            handler(*args)
        except Exception:
            log.exception("%s: error in a handler (deliveries go on)", self.client_id)
        finally:
            self._callback_thread = None
