"""What the scheduler refuses at submission, through `flotta-mqtt submit --wait` against a
real mosquitto, a scheduler and a worker: the command fails at once saying why."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.cli.main import app
from flotta_mqtt.model import Artifact, Collect, Finalize, Iterate, Operation, Parallel
from flotta_mqtt.model.query import IsIn
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import MAX_MESSAGE_BYTES, encode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

TIMEOUT = 20.0


@pytest.fixture
def site(broker: LocalBroker, tmp_path: Path) -> Iterator[list[str]]:
    """A scheduler and one worker holding project `demo`; the CLI's broker and store options."""
    settings = BrokerSettings(url=broker.url)
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    config = SchedulerConfig(
        broker=settings,
        storage=storage,
        database=tmp_path / "scheduler.db",
        worker_grace=60.0,  # longer than TIMEOUT: a refusal must not wait for it
    )
    node = SchedulerNode(config).start(wait=TIMEOUT)
    data = tmp_path / "w0.csv"
    data.write_text("x\n" + "".join(f"{i / 10}\n" for i in range(10)))
    worker = WorkerAgent(
        WorkerConfig(
            name="w0",
            broker=settings,
            storage=storage,
            datasets={"demo": {"paths": [data], "privacy": {"exact": True}}},
            state_dir=tmp_path / "w0.state",
        )
    ).start(wait=TIMEOUT)
    try:
        yield ["--broker", broker.url, "--storage", storage.url]
    finally:
        worker.stop()
        node.stop()


def submit(tmp_path: Path, artifact: Artifact, options: list[str]) -> Result:
    path = tmp_path / "artifact.json"
    path.write_text(artifact.model_dump_json())
    args = ["submit", str(path), "--wait", "--timeout", str(TIMEOUT), *options]
    return CliRunner().invoke(app, args, env={"COLUMNS": "250"}, catch_exceptions=False)


def test_an_iterated_estimator_is_refused_saying_why(site: list[str], tmp_path: Path) -> None:
    count = Operation(name="count")
    steps: list[Any] = [Iterate(2, [Parallel(count, Collect()), Finalize(count)])]
    result = submit(tmp_path, Artifact(project="demo", steps=steps), site)
    assert result.exit_code != 0
    assert "'count' cannot be iterated" in " ".join(result.output.split())


def test_a_first_job_over_the_size_limit_is_refused_naming_it(
    site: list[str], tmp_path: Path
) -> None:
    def count(pad: str) -> Artifact:
        where = IsIn(column="x", values=[pad]).model_dump()
        steps: list[Any] = [Parallel(Operation(name="count", params={"where": where}))]
        return Artifact(id="padded", project="demo", seed=1, steps=steps)

    # The submission itself is within the limit; its job's message is not.
    artifact = count("x" * (MAX_MESSAGE_BYTES - len(encode(count("")))))
    result = submit(tmp_path, artifact, site)
    assert result.exit_code != 0
    output = " ".join(result.output.split())
    assert "MessageTooLarge" in output and f"{MAX_MESSAGE_BYTES}-byte limit" in output
    assert json.dumps({"padded": 1}) not in output  # nothing was computed
