"""What every part needs of the bus: the transport protocol, whichever broker is behind it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, Self

from pydantic import BaseModel

MessageHandler = Callable[[str, bytes], None]
ConnectHandler = Callable[[bool], None]  # called with session_present after each CONNACK


class BusError(RuntimeError):
    """The bus cannot do what was asked: refused connection, full window, broker error."""


@dataclass
class Will:
    """What the broker publishes for this node if it vanishes without saying goodbye."""

    topic: str
    message: BaseModel
    retain: bool = True


class Transport(Protocol):
    """A node's connection to the broker: QoS 1 publishes, subscriptions, a persistent
    session (unless clean), a last will, and acknowledgements the node may control.

    Messages reach `on_message(topic, payload)` on the thread that drives the connection:
    the transport's own thread, or with `threaded=False` the node's thread inside `pump()`.
    """

    client_id: str
    connected: threading.Event

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
