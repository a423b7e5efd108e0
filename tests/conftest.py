"""Fixtures shared by every suite: a real mosquitto or an in-memory broker per test, and
bounded waiting.

- `broker`: a started LocalBroker on a free port with its own data dir, removed after
  the test. A missing mosquitto fails the test (it is a requirement, not an option).
- `broker_settings`: BrokerSettings pointing at that broker.
- `memory_broker`: an in-memory broker of the test's own (`memory://NAME`), closed after
  it; `memory_broker.broker_settings()` are settings for its nodes.
- `wait_for`: the polling helper from tests/helpers.py, as a fixture.
- `postgres_server` (one PostgreSQL server per session) and `postgres_url` (a fresh
  database on it per test): see tests/postgres.py.
tests/helpers.py also holds MessageRecorder, a bus handler a test can wait on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from helpers import wait_for as _wait_for
from postgres import postgres_server, postgres_url  # noqa: F401 - fixtures

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.transport.memory_broker import MemoryBroker, fresh_memory_broker
from flotta_mqtt.transport.settings import BrokerSettings


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """A mosquitto on loopback, fresh for each test; `broker.url` is where it listens."""
    try:
        local = LocalBroker()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    with local:
        yield local


@pytest.fixture
def broker_settings(broker: LocalBroker) -> BrokerSettings:
    return BrokerSettings(url=broker.url)


@pytest.fixture
def memory_broker() -> Iterator[MemoryBroker]:
    broker = fresh_memory_broker()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., None]:
    """`wait_for(predicate, timeout=10.0, message=...)`: poll, fail the test on timeout."""
    return _wait_for
