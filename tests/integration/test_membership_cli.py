"""Membership through the CLI: with the operator's registry, a count submitted while only
one of two holders runs covers both holders once the second comes up, and never returns
one holder's count as the whole; a quorum returns early and names the holder left out."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli_processes import TIMEOUT, cli, online

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import Artifact, ArtifactState, Collect, Finalize, Operation, Parallel
from flotta_mqtt.transport.settings import BrokerSettings

pytestmark = pytest.mark.integration

ROWS = {"site-a": 17, "site-b": 25}


@pytest.fixture
def deployment(broker: LocalBroker, tmp_path: Path) -> Iterator[dict[str, object]]:
    """A registry naming two holders of `demo`, a scheduler process reading it, and a way
    to start each holder's worker process (stopped at the end)."""
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        "scheduler: scheduler\n"
        "workers:\n"
        "  site-a: {projects: [demo]}\n"
        "  site-b: {projects: [demo]}\n"
        "workbenches:\n"
        "  lab: {}\n"
    )
    store = (tmp_path / "store").as_uri()
    processes: list[subprocess.Popen[str]] = []

    def start_worker(name: str) -> None:
        data = tmp_path / f"{name}.csv"
        data.write_text("x\n" + "".join(f"{i}\n" for i in range(ROWS[name])))
        args = ["worker", "--name", name, "--data", f"demo={data}", "--exact", "demo"]
        args += ["--broker", broker.url]
        args += ["--storage", store, "--state-dir", str(tmp_path / name)]
        processes.append(cli(*args))
        online(broker.url, name)

    processes.append(
        cli(
            "scheduler",
            "--broker",
            broker.url,
            "--storage",
            store,
            "--database",
            str(tmp_path / "scheduler.db"),
            "--registry",
            str(registry),
        )
    )
    online(broker.url, "scheduler.initiator")
    try:
        yield {"start_worker": start_worker}
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=TIMEOUT)


def count(**fields: object) -> Artifact:
    counted = Operation(name="count")
    steps = [Parallel(counted, Collect()), Finalize(counted)]
    return Artifact(project="demo", steps=steps, **fields)  # type: ignore[arg-type]


def test_a_count_waits_for_every_registered_holder(
    broker: LocalBroker, deployment: dict[str, object]
) -> None:
    start_worker = deployment["start_worker"]
    assert callable(start_worker)
    start_worker("site-a")
    with Client(BrokerSettings(url=broker.url)) as client:
        handle = client.submit(count())
        client.wait_for(
            lambda: (s := handle.status()) is not None and s.counts.get("completed", 0) >= 1,
            timeout=TIMEOUT,
        )
        status = handle.status()
        assert status is not None and status.state is ArtifactState.RUNNING
        assert status.holders == ["site-a", "site-b"] and status.missing == []
        start_worker("site-b")
        assert handle.result(timeout=TIMEOUT) == sum(ROWS.values())


def test_a_quorum_returns_early_and_names_the_holder_left_out(
    broker: LocalBroker, deployment: dict[str, object]
) -> None:
    start_worker = deployment["start_worker"]
    assert callable(start_worker)
    start_worker("site-b")
    with Client(BrokerSettings(url=broker.url)) as client:
        handle = client.submit(count(quorum=1))
        assert handle.result(timeout=TIMEOUT) == ROWS["site-b"]
        status = handle.status()
        assert status is not None
        assert (status.holders, status.missing) == (["site-b"], ["site-a"])


def test_status_shows_the_holders_and_the_missing(
    broker: LocalBroker, deployment: dict[str, object]
) -> None:
    start_worker = deployment["start_worker"]
    assert callable(start_worker)
    start_worker("site-a")
    # With a registry only the owner (or an admin) may ask: both connect as `lab`.
    with Client(BrokerSettings(url=broker.url, username="lab")) as client:
        handle = client.submit(count(quorum=1))
        handle.result(timeout=TIMEOUT)
    process = cli("status", handle.artifact_id, "--broker", broker.url, "--username", "lab")
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err
    assert "holders: site-a; missing: site-b" in out
