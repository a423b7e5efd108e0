"""Every role together on the in-memory transport: a workbench's Client, a scheduler with
its embedded initiator, and data workers, on one memory:// broker with no broker process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flotta_mqtt import Artifact, Client, Collect, Compare, Finalize, Operation, Parallel
from flotta_mqtt.model import ArtifactState, Sequential
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.memory import fresh_memory_broker
from flotta_mqtt.transport.settings import StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

TIMEOUT = 20.0
# Over the workers' minimum group size (5) on either side of the filter x > 0.5.
ROWS = {"w0": [i / 20 for i in range(20)], "w1": [i / 13 for i in range(13)]}


class Cluster:
    """A scheduler node and two data workers sharing a store in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.broker = fresh_memory_broker("nodes").broker_settings()
        self.storage = StorageSettings(url=(folder / "store").as_uri())
        config = SchedulerConfig(
            broker=self.broker,
            storage=self.storage,
            database=folder / "scheduler.db",
            worker_grace=0.5,  # every worker here is up before anything is submitted
        )
        self.node = SchedulerNode(config).start(wait=TIMEOUT)
        self.workers = []
        for name, xs in ROWS.items():
            data = folder / f"{name}.csv"
            data.write_text("x\n" + "".join(f"{x}\n" for x in xs))
            worker = WorkerConfig(
                name=name,
                broker=self.broker,
                storage=self.storage,
                datasets={"demo": {"paths": [data], "privacy": {"exact": True}}},
                state_dir=folder / f"{name}.state",
            )
            self.workers.append(WorkerAgent(worker).start(wait=TIMEOUT))

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path)
    yield nodes
    nodes.stop()


WHERE = Compare(column="x", op=">", value=0.5).model_dump()


@pytest.mark.parametrize(
    "steps",
    [
        [
            Parallel(Operation(name="count", params={"where": WHERE}), Collect()),
            Finalize(Operation(name="count")),
        ],
        [Sequential(Operation(name="count", params={"where": WHERE}))],
    ],
    ids=["parallel-collect-finalize", "sequential"],
)
def test_a_federated_count_runs_through_every_role(cluster: Cluster, steps: list[object]) -> None:
    with Client(cluster.broker, storage=cluster.storage) as client:
        handle = client.submit(Artifact(project="demo", steps=steps))
        status = handle.wait(timeout=TIMEOUT)
        assert status.state is ArtifactState.COMPLETED, status.error
        assert handle.result() == sum(x > 0.5 for xs in ROWS.values() for x in xs)


def test_an_unknown_operation_fails_the_artifact_with_its_name(cluster: Cluster) -> None:
    with Client(cluster.broker, storage=cluster.storage) as client:
        artifact = Artifact(project="demo", steps=[Parallel(Operation(name="no_such_op"))])
        status = client.submit(artifact).wait(timeout=TIMEOUT)
        assert status.state is ArtifactState.FAILED
        assert status.error is not None and "no_such_op" in status.error.message
