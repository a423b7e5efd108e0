"""The transport layer: the bus (paho over an MQTT broker, or in memory) and the resource store."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from flotta_mqtt.transport.base import (
    BrokerRefused,
    BusError,
    ConnectHandler,
    FailureHandler,
    IdentityInUse,
    MessageHandler,
    Transport,
    Will,
)
from flotta_mqtt.transport.settings import BrokerSettings

__all__ = [
    "BrokerRefused",
    "BusError",
    "ConnectHandler",
    "FailureHandler",
    "IdentityInUse",
    "MessageHandler",
    "Transport",
    "Will",
    "open_bus",
]


def open_bus(
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
) -> Transport:
    """A bus to the broker `settings.url` names: `memory://NAME` is an in-memory broker
    shared by the nodes of this process (the roles' unit tests); anything else is MQTT.

    It claims its identity (transport/claims.py) unless `claim` is False: then, as any
    MQTT client, it takes over the session of another process with its client id."""
    bus: Callable[..., Transport]
    if urlsplit(settings.url).scheme == "memory":
        from flotta_mqtt.transport.memory import MemoryBus

        bus = MemoryBus
    else:
        from flotta_mqtt.transport.bus import Bus

        bus = Bus
    return bus(
        client_id,
        settings,
        on_message,
        subscriptions,
        will=will,
        on_connect=on_connect,
        on_failure=on_failure,
        clean=clean,
        threaded=threaded,
        claim=claim,
    )
