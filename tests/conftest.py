"""Fixtures shared by every suite: a real mosquitto per test, and bounded waiting.

- `broker`: a started LocalBroker on a free port with its own data dir, removed after
  the test. A missing mosquitto fails the test (it is a requirement, not an option).
- `broker_config`: a BrokerConfig pointing at that broker.
- `wait_for`: the polling helper from tests/helpers.py, as a fixture.
tests/helpers.py also holds MessageRecorder, a bus handler a test can wait on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from helpers import wait_for as _wait_for

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.transport.bus import BrokerConfig


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
def broker_config(broker: LocalBroker) -> BrokerConfig:
    return BrokerConfig(url=broker.url)


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., None]:
    """`wait_for(predicate, timeout=10.0, message=...)`: poll, fail the test on timeout."""
    return _wait_for
