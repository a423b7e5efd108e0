"""The broker flags every command shares, and the client a workbench command opens.

Kept apart from settings.py (a node's settings), which loads the node's libraries
(analytics: pyarrow, DuckDB, OpenDP), which a workbench command never needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flotta_mqtt.client.client import Client
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

CONNECT_TIMEOUT = 10.0  # seconds a command with no --timeout waits for the broker


def broker_options(
    url: str | None,
    username: str | None,
    password: str | None,
    ca: Path | None,
    group: str | None = None,
) -> dict[str, Any]:
    """The broker settings the command's flags give (those not given are left out)."""
    given = {
        "url": url,
        "username": username,
        "password": password,
        "ca_file": ca,
        "group": group,
    }
    return {key: str(value) for key, value in given.items() if value is not None}


def open_client(
    broker: str | None,
    username: str | None,
    password: str | None,
    ca: Path | None,
    storage: str | None,
    group: str | None = None,
    timeout: float | None = None,
) -> Client:
    """A client connected with the command's options, waiting for the broker `timeout` s."""
    given = broker_options(broker, username, password, ca, group)
    settings = BrokerSettings.model_validate(given)
    store = StorageSettings(url=storage) if storage else None
    wait = CONNECT_TIMEOUT if timeout is None else timeout
    return Client(settings, storage=store, connect_timeout=wait)
