"""What the scheduler refuses at submission rather than at run time, through a workbench's
Client on the in-memory transport: the artifact fails at once with a reason saying why,
and no job is dispatched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flotta_mqtt import Artifact, Client, Collect, Finalize, Iterate, Operation, Parallel
from flotta_mqtt.model import ArtifactState
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.memory import fresh_memory_broker
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

TIMEOUT = 20.0
ROWS = [i / 10 for i in range(10)]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    """A workbench beside a scheduler and one worker holding project `demo`."""
    broker = BrokerSettings(url=f"memory://{fresh_memory_broker('checks').name}")
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    config = SchedulerConfig(
        broker=broker, storage=storage, database=tmp_path / "scheduler.db", worker_grace=2.0
    )
    node = SchedulerNode(config).start(wait=TIMEOUT)
    data = tmp_path / "w0.csv"
    data.write_text("x\n" + "".join(f"{x}\n" for x in ROWS))
    worker = WorkerAgent(
        WorkerConfig(
            name="w0",
            broker=broker,
            storage=storage,
            datasets={"demo": [data]},
            state_dir=tmp_path / "w0.state",
        )
    ).start(wait=TIMEOUT)
    try:
        with Client(broker, storage=storage) as workbench:
            yield workbench
    finally:
        worker.stop()
        node.stop()


def test_an_iterated_estimator_is_refused_saying_why(client: Client) -> None:
    count = Operation(name="count")
    artifact = Artifact(
        project="demo", steps=[Iterate(2, [Parallel(count, Collect()), Finalize(count)])]
    )
    status = client.submit(artifact).wait(timeout=TIMEOUT)
    assert status.state is ArtifactState.FAILED
    assert status.error is not None
    assert "'count' cannot be iterated" in status.error.message
    assert "round 1's result" in status.error.message
    assert status.counts.get("completed", 0) == 0  # refused before any job ran


def test_one_round_of_an_estimator_still_runs(client: Client) -> None:
    count = Operation(name="count")
    artifact = Artifact(
        project="demo", steps=[Iterate(1, [Parallel(count, Collect()), Finalize(count)])]
    )
    assert client.submit(artifact).result(timeout=TIMEOUT) == len(ROWS)
