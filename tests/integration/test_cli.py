"""The `flotta-mqtt` command. Workbench commands run in-process with typer's CliRunner
against a real mosquitto and in-process scheduler and workers; node commands (which
serve until signalled) are covered by their help here and by test_runtime_crash.py.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_for
from pydantic import ValidationError
from typer.testing import CliRunner, Result

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.cli.main import app
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import Artifact, ArtifactState, Collect, Finalize, Operation, Parallel
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "tests.plugins.test_ops"
WORKERS = ("node-a", "node-b", "node-c")
TIMEOUT = 20.0

COUNT_ARTIFACT = {
    "id": "cli-count-1",
    "project": "demo",
    "steps": [
        {
            "kind": "parallel",
            "operation": {
                "name": "count",
                "params": {"where": {"kind": "compare", "column": "x", "op": ">", "value": 0.5}},
            },
            "distribution": {"kind": "collect"},
        },
        {"kind": "finalize", "operation": {"name": "count"}},
    ],
}
# Collect joins many jobs into one: into a Parallel step it cannot.
COLLECT_INTO_PARALLEL = {
    "project": "demo",
    "steps": [
        {
            "kind": "parallel",
            "operation": {"name": "count"},
            "distribution": {"kind": "collect"},
        },
        {"kind": "parallel", "operation": {"name": "count"}},
    ],
}


def invoke(*args: str) -> Result:
    """Run the CLI in-process; a wide terminal so rich does not wrap what tests look for."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"}, catch_exceptions=False)


def flat(text: str) -> str:
    """Text with every run of whitespace made one space: immune to line wrapping."""
    return " ".join(text.split())


# --- help ---------------------------------------------------------------------------------

PURPOSES = {
    "scheduler": "Run a scheduler node",
    "worker": "Run an edge worker agent",
    "submit": "Submit an artifact or workflow file",
    "status": "Show an artifact's current status",
    "download": "Write an artifact's result",
    "workers": "List the nodes known to the broker",
    "cancel": "Cancel an artifact",
    "validate": "Check an artifact or workflow file",
    "demo": "count the rows with x > 0.5",
}


def test_the_installed_command_answers_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flotta_mqtt.cli", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert done.returncode == 0, done.stderr
    assert "distributed jobs over MQTT" in flat(done.stdout)
    for command in PURPOSES:
        assert command in done.stdout


@pytest.mark.parametrize("command", sorted(PURPOSES))
def test_each_command_explains_itself(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert PURPOSES[command] in flat(result.output)


def test_no_arguments_shows_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command, purpose in PURPOSES.items():
        assert command in result.output
        assert purpose in flat(result.output)


# --- validate --------------------------------------------------------------------------------


def test_validate_accepts_a_good_artifact(tmp_path: Path) -> None:
    path = tmp_path / "count.json"
    path.write_text(json.dumps(COUNT_ARTIFACT))
    result = invoke("validate", str(path))
    assert result.exit_code == 0, result.output
    assert "valid: artifact cli-count-1, 2 steps" in flat(result.output)


def test_validate_accepts_the_yaml_example() -> None:
    result = invoke("validate", str(REPO / "examples" / "count.yaml"))
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_validate_refuses_collect_into_parallel_saying_why(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(COLLECT_INTO_PARALLEL))  # JSON is YAML too
    result = invoke("validate", str(path))
    assert result.exit_code == 2
    output = flat(result.output)
    assert "is not a valid artifact" in output
    assert (
        "step 0 (parallel) → step 1 (parallel): Collect needs exactly one job in the next step"
        in output
    )
    # The whole of the validation error reaches the user, brackets and all.
    with pytest.raises(ValidationError) as error:
        Artifact.model_validate(COLLECT_INTO_PARALLEL)
    assert flat(str(error.value)) in output


def test_validate_names_a_missing_file(tmp_path: Path) -> None:
    result = invoke("validate", str(tmp_path / "absent.yaml"))
    assert result.exit_code == 2
    assert "config file not found" in flat(result.output)


# --- against a running scheduler and workers -------------------------------------------------


@dataclass
class Running:
    broker_url: str
    storage: str
    expected: int  # rows with x > 0.5 over every worker's data
    client: Client


@pytest.fixture
def running(broker: LocalBroker, tmp_path: Path) -> Iterator[Running]:
    """A scheduler and three workers in this process, and a workbench that saw them online."""
    rng = random.Random(11)
    broker_settings = BrokerSettings(url=broker.url)
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    nodes: list[SchedulerNode | WorkerAgent] = []
    expected = 0
    try:
        config = SchedulerConfig(
            broker=broker_settings,
            storage=storage,
            database=tmp_path / "scheduler.db",
            initiator_plugins=[PLUGIN],
        )
        nodes.append(SchedulerNode(config).start(wait=TIMEOUT))
        for i, name in enumerate(WORKERS):
            xs = [rng.random() for _ in range(50 + 31 * i)]
            expected += sum(1 for x in xs if x > 0.5)
            path = tmp_path / f"{name}.csv"
            path.write_text("x\n" + "".join(f"{x!r}\n" for x in xs))
            worker = WorkerConfig(
                name=name,
                broker=broker_settings,
                storage=storage,
                datasets={"demo": {"paths": [path], "privacy": {"exact": True}}},
                plugins=[PLUGIN],
            )
            nodes.append(WorkerAgent(worker).start(wait=TIMEOUT))
        with Client(broker_settings, storage=storage) as client:
            names = {*WORKERS, config.initiator}
            wait_for(
                lambda: names <= {p.node for p in client.workers() if p.online},
                timeout=TIMEOUT,
                message="the nodes never came online",
            )
            yield Running(broker.url, storage.url, expected, client)
    finally:
        for node in reversed(nodes):
            node.stop()


def test_submit_wait_status_download_and_workers(running: Running, tmp_path: Path) -> None:
    broker = ["--broker", running.broker_url]
    store = ["--storage", running.storage]
    path = tmp_path / "count.json"
    path.write_text(json.dumps(COUNT_ARTIFACT))

    result = invoke("submit", str(path), "--wait", "--timeout", str(TIMEOUT), *broker, *store)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "submitted artifact cli-count-1"
    assert lines[1] == f"holders: {', '.join(sorted(WORKERS))}"  # every holder took part
    assert json.loads("\n".join(lines[2:])) == running.expected

    result = invoke("status", "cli-count-1", "--output", "json", *broker)
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["artifact_id"] == "cli-count-1"
    assert status["state"] == ArtifactState.COMPLETED
    assert status["total"] == len(WORKERS) + 1
    assert status["counts"] == {"completed": len(WORKERS) + 1}

    result = invoke("status", "cli-count-1", *broker)
    assert result.exit_code == 0, result.output
    assert "completed" in result.output and "artifact cli-count-1" in result.output

    target = tmp_path / "out" / "result.json"
    target.parent.mkdir()
    result = invoke(
        "download", "cli-count-1", str(target), "--timeout", str(TIMEOUT), *broker, *store
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {target}" in flat(result.output)
    assert json.loads(target.read_text()) == running.expected

    result = invoke("workers", "--output", "json", *broker)
    assert result.exit_code == 0, result.output
    nodes = {node["node"]: node for node in json.loads(result.output)}
    assert set(nodes) == {*WORKERS, "scheduler.initiator"}
    assert all(nodes[name]["online"] and nodes[name]["projects"] == ["demo"] for name in WORKERS)
    assert nodes["scheduler.initiator"]["initiator"] is True

    result = invoke("workers", *broker)
    assert result.exit_code == 0, result.output
    for name in (*WORKERS, "scheduler.initiator"):
        assert name in result.output


def test_status_of_an_unknown_artifact_is_an_error(running: Running) -> None:
    result = invoke("status", "never-submitted", "--broker", running.broker_url)
    assert result.exit_code == 2
    assert "no such artifact ID never-submitted" in flat(result.output)


def test_submit_wait_reports_a_failed_artifact(running: Running, tmp_path: Path) -> None:
    path = tmp_path / "boom.json"
    steps = [
        Parallel(Operation(name="boom", params={"message": "[bad] input"}), Collect()),
        Finalize(Operation(name="count")),
    ]
    artifact = Artifact(project="demo", steps=steps)
    path.write_text(artifact.model_dump_json())
    result = invoke(
        "submit", str(path), "--wait", "--timeout", str(TIMEOUT), "--broker", running.broker_url
    )
    assert result.exit_code == 2
    output = flat(result.output)
    assert f"artifact {artifact.id} failed in job" in output
    assert "ValueError: boom: [bad] input" in output  # printed as it is, not as markup
    assert "_explode" in output  # the remote traceback

    result = invoke("status", artifact.id, "--broker", running.broker_url)
    assert result.exit_code == 0, result.output
    assert "failed" in result.output
    assert "ValueError: boom: [bad] input" in result.output


def test_cancel_stops_a_running_artifact(running: Running, tmp_path: Path) -> None:
    flag = tmp_path / "never"
    slow = Operation(name="slow", params={"flag": str(flag)})
    artifact = Artifact(project="demo", steps=[Parallel(slow, Collect()), Finalize(slow)])
    handle = running.client.submit(artifact)
    try:
        wait_for(lambda: handle.status() is not None, timeout=TIMEOUT)  # the scheduler has it
        result = invoke("cancel", artifact.id, "--broker", running.broker_url)
        assert result.exit_code == 0, result.output
        assert f"artifact {artifact.id}: cancelled" in flat(result.output)
        assert handle.wait(timeout=TIMEOUT).state is ArtifactState.CANCELLED
    finally:
        flag.touch()


def test_worker_options_reach_its_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every worker flag lands in the settings the agent starts with (none silently dropped)."""
    import flotta_mqtt.cli.main as cli

    started: list[WorkerConfig] = []
    monkeypatch.setattr(
        "flotta_mqtt.worker.agent.WorkerAgent", lambda config, gave_up: started.append(config)
    )
    monkeypatch.setattr(cli, "serve", lambda make, what, console: make(print))
    data = tmp_path / "d.csv"
    data.write_text("x\n1\n")
    result = invoke(
        "worker",
        "--name",
        "w9",
        "--data",
        f"p={data}",
        "--max-jobs",
        "3",
        "--executor",
        "shell",
        "--executor",
        "api",
        "--allow-code",
        "--state-dir",
        str(tmp_path / "state"),
        "--plugin",
        "tests.plugins.test_ops",
    )
    assert result.exit_code == 0, result.output
    (config,) = started
    assert (config.name, config.max_jobs, config.allow_code) == ("w9", 3, True)
    assert config.executors == ["shell", "api"]
    assert config.state_dir == tmp_path / "state"
    assert config.plugins == ["tests.plugins.test_ops"]
    assert "p" in config.datasets


def test_node_options_read_their_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The FLOTTA_* variables of the node commands land in their settings, paths absolute."""
    import flotta_mqtt.cli.main as cli

    started: list[WorkerConfig | SchedulerConfig] = []
    monkeypatch.setattr(
        "flotta_mqtt.worker.agent.WorkerAgent", lambda config, gave_up: started.append(config)
    )
    monkeypatch.setattr(
        "flotta_mqtt.nodes.SchedulerNode", lambda config, gave_up: started.append(config)
    )
    monkeypatch.setattr(cli, "serve", lambda make, what, console: make(print))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("x\n1\n")
    env = {
        "FLOTTA_NAME": "w7",
        "FLOTTA_DATA": "p=d.csv",
        "FLOTTA_EXECUTORS": "shell api",
        "FLOTTA_PLUGINS": PLUGIN,
        "FLOTTA_STORAGE": "file://./store",
        "FLOTTA_METRICS_PORT": "9123",
        "FLOTTA_DATABASE": "s.db",
    }
    for command in ("worker", "scheduler"):
        result = CliRunner().invoke(app, [command], env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    worker, scheduler = started
    assert isinstance(worker, WorkerConfig) and isinstance(scheduler, SchedulerConfig)
    assert worker.executors == ["shell", "api"] and worker.plugins == [PLUGIN]
    assert worker.datasets["p"].paths == [tmp_path / "d.csv"]
    assert worker.state_dir == tmp_path / "flotta-state" / "w7"
    assert worker.storage.url == scheduler.storage.url == (tmp_path / "store").as_uri()
    assert scheduler.metrics_port == 9123 and scheduler.database == tmp_path / "s.db"


def test_a_postgresql_database_is_kept_as_its_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--database postgresql://...` is a URL, not a path made absolute (its `//` folded);
    the embedded initiator keeps its state in the working directory's flotta-state."""
    import flotta_mqtt.cli.main as cli

    started: list[SchedulerConfig] = []
    monkeypatch.setattr(
        "flotta_mqtt.nodes.SchedulerNode", lambda config, gave_up: started.append(config)
    )
    monkeypatch.setattr(cli, "serve", lambda make, what, console: make(print))
    monkeypatch.chdir(tmp_path)
    url = "postgresql://flotta@db.example:5432/flotta"
    result = CliRunner().invoke(app, ["scheduler", "--database", url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert started[0].database == url
    assert started[0].folder == tmp_path / "flotta-state"
