"""Requests about an artifact id the scheduler never saw are answered at once with a
rejection naming it, on the in-memory transport: nothing waits for a status that never
comes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flotta_mqtt import Artifact, Client, Operation, Parallel
from flotta_mqtt.client.client import NoSuchArtifact
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.memory import fresh_memory_broker
from flotta_mqtt.transport.settings import StorageSettings

TIMEOUT = 20.0
FAST = 2.0  # seconds an answer about an unknown id may take


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    broker = fresh_memory_broker("unknown").broker_settings()
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    config = SchedulerConfig(
        broker=broker, storage=storage, database=tmp_path / "scheduler.db", worker_grace=0.1
    )
    node = SchedulerNode(config).start(wait=TIMEOUT)
    try:
        with Client(broker, storage=storage) as workbench:
            yield workbench
    finally:
        node.stop()


def test_looking_up_an_unknown_id_fails_fast_naming_it(client: Client) -> None:
    started = time.monotonic()
    with pytest.raises(NoSuchArtifact, match="no such artifact ID never-submitted"):
        client.lookup("never-submitted", timeout=TIMEOUT)
    assert time.monotonic() - started < FAST


def test_downloading_an_unknown_id_fails_fast(client: Client, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(NoSuchArtifact) as caught:
        client.lookup("never-submitted", timeout=TIMEOUT).download(tmp_path / "out.json")
    assert caught.value.artifact_id == "never-submitted"
    assert time.monotonic() - started < FAST


def test_cancelling_an_unknown_id_fails_the_wait_fast(client: Client) -> None:
    started = time.monotonic()
    client.cancel("never-submitted")
    with pytest.raises(NoSuchArtifact, match="never-submitted"):
        client.handle("never-submitted").wait(timeout=TIMEOUT)
    assert time.monotonic() - started < FAST


def test_looking_up_a_known_id_gives_its_status(client: Client) -> None:
    # No worker holds the project: the artifact fails, but it exists.
    artifact = Artifact(project="nobody", steps=[Parallel(operation=Operation(name="count"))])
    client.submit(artifact).wait(timeout=TIMEOUT)
    status = client.lookup(artifact.id, timeout=TIMEOUT).status()
    assert status is not None and status.artifact_id == artifact.id


def test_an_id_looked_up_before_it_existed_can_be_submitted(client: Client) -> None:
    artifact = Artifact(project="nobody", steps=[Parallel(operation=Operation(name="count"))])
    with pytest.raises(NoSuchArtifact):
        client.lookup(artifact.id, timeout=TIMEOUT)
    status = client.submit(artifact).wait(timeout=TIMEOUT)
    assert status.artifact_id == artifact.id
