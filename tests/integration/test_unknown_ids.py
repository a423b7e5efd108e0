"""The CLI's commands about one artifact, given an id the scheduler never saw, against a
real mosquitto and scheduler: each answers within 2 s, in one line naming the id."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.cli.main import app
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

pytestmark = pytest.mark.integration

TIMEOUT = 20.0
FAST = 2.0


@pytest.fixture
def scheduler(broker: LocalBroker, tmp_path: Path) -> Iterator[str]:
    config = SchedulerConfig(
        broker=BrokerSettings(url=broker.url),
        storage=StorageSettings(url=(tmp_path / "store").as_uri()),
        database=tmp_path / "scheduler.db",
    )
    node = SchedulerNode(config).start(wait=TIMEOUT)
    try:
        yield broker.url
    finally:
        node.stop()


@pytest.mark.parametrize(
    "command",
    [["status"], ["download", "out.json"], ["cancel"], ["logs"]],
    ids=["status", "download", "cancel", "logs"],
)
def test_an_unknown_id_is_answered_fast(scheduler: str, command: list[str]) -> None:
    args = [command[0], "never-submitted", *command[1:], "--broker", scheduler]
    started = time.monotonic()
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"}, catch_exceptions=False)
    assert time.monotonic() - started < FAST
    assert result.exit_code != 0
    assert "no such artifact ID never-submitted" in result.output
