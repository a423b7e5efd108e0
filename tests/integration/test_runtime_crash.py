"""Crashes of real node processes: `python -m flotta_mqtt.cli scheduler|worker`, SIGKILLed
mid-artifact and started again, against the real mosquitto of the `broker` fixture.

The workbench runs in the test process. Workers load the test operations with
`--plugin tests.plugins.test_ops` (PYTHONPATH is the repository root), the scheduler's
initiator through `initiator_plugins` in its config file.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import MessageRecorder, messages_of, wait_for

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import ArtifactHandle, Client
from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    Collect,
    Finalize,
    Iterate,
    JobState,
    Operation,
    Parallel,
    Sequential,
)
from flotta_mqtt.protocol import ArtifactStatus, JobReady, JobStarted, topics
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "tests.plugins.test_ops"
PROJECT = "demo"
WORKERS = ("w0", "w1", "w2")
INITIATOR = "scheduler.initiator"
TIMEOUT = 30.0  # node processes start in about a second, more on a busy machine


class Nodes:
    """Node processes on one broker and store, each logging to a file in `folder`."""

    def __init__(self, broker_url: str, folder: Path) -> None:
        self.broker_url = broker_url
        self.folder = folder
        self.storage = (folder / "store").as_uri()
        self.database = folder / "scheduler.db"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        config = folder / "scheduler.yaml"
        config.write_text(f"initiator_plugins: [{PLUGIN}]\nworker_grace: 10\n")
        self._scheduler_args = ["scheduler", "--config", str(config)]
        self._scheduler_args += ["--database", str(self.database)]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTTA_")}
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        rng = random.Random(5)
        self.data: dict[str, Path] = {}
        for name, rows in zip(WORKERS, (40, 70, 110), strict=True):
            path = folder / f"{name}.csv"
            path.write_text("x\n" + "".join(f"{rng.random()!r}\n" for _ in range(rows)))
            self.data[name] = path

    def _start(self, name: str, args: list[str]) -> None:
        assert name not in self.processes or self.processes[name].poll() is not None
        common = ["--broker", self.broker_url, "--storage", self.storage, "--log-level", "INFO"]
        with (self.folder / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "flotta_mqtt.cli", *args, *common],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def scheduler(self) -> None:
        self._start("scheduler", self._scheduler_args)

    def worker(self, name: str) -> None:
        data = f"{PROJECT}={self.data[name]}"
        state = str(self.folder / "state" / name)  # its journal survives the kill
        self._start(
            name,
            ["worker", "--name", name, "--data", data, "--plugin", PLUGIN, "--state-dir", state],
        )

    def kill(self, name: str) -> None:
        """SIGKILL: no goodbye, no flush; the broker publishes the node's last will."""
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT)

    def stop(self, name: str) -> None:
        """SIGTERM: the node stops cleanly (the scheduler closes its database)."""
        process = self.processes[name]
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}.log\n{(self.folder / f'{name}.log').read_text()[-3000:]}"
            for name in self.processes
        )


@pytest.fixture
def nodes(broker: LocalBroker, tmp_path: Path) -> Iterator[Nodes]:
    running = Nodes(broker.url, tmp_path)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def client(nodes: Nodes) -> Iterator[Client]:
    with Client(
        BrokerSettings(url=nodes.broker_url),
        storage=StorageSettings(url=nodes.storage),
        resend_interval=1.0,
    ) as workbench:
        yield workbench


def presence(client: Client) -> dict[str, bool]:
    return {p.node: p.online for p in client.workers(timeout=TIMEOUT)}


def wait_presence(client: Client, names: tuple[str, ...] | list[str], online: bool = True) -> None:
    wait_for(
        lambda: all(presence(client).get(name) is online for name in names),
        timeout=TIMEOUT,
        message=f"{names} never {'online' if online else 'offline'}",
    )


def wait_status(
    handle: ArtifactHandle, predicate: Callable[[ArtifactStatus], bool], what: str
) -> ArtifactStatus:
    def settled() -> bool:
        status = handle.status()
        return status is not None and predicate(status)

    if not settled():
        wait_for(settled, timeout=TIMEOUT, message=f"artifact {handle.artifact_id} never {what}")
    status = handle.status()
    assert status is not None
    return status


def completed(status: ArtifactStatus) -> int:
    return status.counts.get(JobState.COMPLETED, 0)


def job_rows(database: Path, artifact_id: str) -> list[tuple[int, str, int]]:
    with sqlite3.connect(database) as db:
        return db.execute(
            "SELECT job_id, state, attempt FROM jobs WHERE artifact_id = ? ORDER BY job_id",
            (artifact_id,),
        ).fetchall()


def test_scheduler_killed_mid_artifact_resumes_from_its_database(
    nodes: Nodes, client: Client
) -> None:
    nodes.scheduler()
    for name in WORKERS:
        nodes.worker(name)
    wait_presence(client, [*WORKERS, INITIATOR])

    # Six rounds of initiator → w0 → w1 → w2 → initiator: 30 jobs, one after another.
    # Each local `once` adds 1 to the running total and writes a ledger line, so the
    # result is 18 exactly when every local job's effect is counted once.
    ledger = nodes.folder / "ledger"
    once = Operation(name="once", params={"ledger": str(ledger), "seconds": 0.05})
    rounds = 6
    artifact = Artifact(project=PROJECT, steps=[Iterate(rounds, [Sequential(once)])])
    handle = client.submit(artifact)
    wait_status(handle, lambda s: completed(s) >= 8, "got a third of the way")

    nodes.kill("scheduler")
    before = handle.status()
    assert before is not None, nodes.logs()
    assert before.state is ArtifactState.RUNNING and completed(before) < before.total == 30

    nodes.scheduler()  # the same database, the same persistent session
    assert handle.result(timeout=TIMEOUT) == rounds * len(WORKERS), nodes.logs()

    nodes.stop("scheduler")
    rows = job_rows(nodes.database, artifact.id)
    assert [(job, state) for job, state, _ in rows] == [(j, JobState.COMPLETED) for j in range(30)]
    local = {j for j in range(30) if j % 5 not in (0, 4)}  # 5 jobs a round: init, w0-w2, agg
    # A worker's job is bound to its data: it is never moved, so it never needs a second
    # attempt. (The initiator's may move to a new attempt while the initiator was down.)
    assert all(attempt == 1 for job, _, attempt in rows if job in local)
    lines = [line.split() for line in ledger.read_text().splitlines()]
    assert sorted(
        int(job) for _, artifact_id, job in lines if artifact_id == artifact.id
    ) == sorted(local), "some local job ran twice or never"
    assert {node for node, _, _ in lines} == set(WORKERS)


def test_worker_killed_mid_job_gets_it_again_when_restarted(
    nodes: Nodes, client: Client, broker: LocalBroker
) -> None:
    nodes.scheduler()
    for name in WORKERS:
        nodes.worker(name)
    wait_presence(client, [*WORKERS, INITIATOR])
    messages = MessageRecorder()
    watch = Bus(
        client_id="crash-observer",
        settings=BrokerSettings(url=broker.url),
        on_message=messages,
        subscriptions=[topics.events("w1"), topics.jobs("w1")],
        clean=True,
    ).start(wait=TIMEOUT)
    try:
        flag = nodes.folder / "go"
        slow = Operation(name="slow", params={"flag": str(flag)})
        artifact = Artifact(
            project=PROJECT, steps=[Parallel(slow, Collect()), Finalize(Operation(name="slow"))]
        )
        handle = client.submit(artifact)

        def w1_started(seen: list[tuple[str, bytes]]) -> bool:
            return bool(messages_of(seen, JobStarted, lambda e: e.job.job_id == 1))

        messages.wait_for(w1_started, timeout=TIMEOUT, message="w1 never started its job")
        nodes.kill("w1")  # mid-job: it holds job 1, which waits for the flag
        wait_presence(client, ["w1"], online=False)  # its last will

        flag.touch()  # w0 and w2 finish; job 1 and the Finalize wait for w1
        status = wait_status(handle, lambda s: completed(s) == 2, "completed w0's and w2's jobs")
        assert status.state is ArtifactState.RUNNING

        nodes.worker("w1")  # the same name and state dir: its journal holds job 1
        assert handle.result(timeout=TIMEOUT) == len(WORKERS), nodes.logs()
        dispatches = messages_of(messages.messages, JobReady)
    finally:
        watch.stop()
    # The restarted worker resumes job 1 from its journal (the scheduler may also re-send it
    # when w1 comes back): either way it stays attempt 1, since its data lives only on w1.
    assert dispatches, "job 1 was never dispatched"
    assert {(j.job_id, j.attempt) for j in dispatches} == {(1, 1)}
