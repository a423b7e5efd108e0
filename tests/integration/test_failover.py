"""Active/standby schedulers on one PostgreSQL database: real `flotta-mqtt scheduler`
processes of one name, one leading, the others standing by, on the real mosquitto of the
`broker` fixture. The leader is SIGKILLed mid-artifact again and again; each time a
standby takes over (its claim on sessions/scheduler, which names its process, is how the
bus learns who leads) and carries the artifact on: its result is right, and every local
job ran exactly once (a ledger line per execution, written by the worker).

The workbench and workers reconnect to nothing: they know the scheduler only by its
topics and its one broker identity, whose persistent session (and every message queued
in it while nobody led) the new leader takes over.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import MessageRecorder, messages_of
from test_runtime_crash import (
    INITIATOR,
    PLUGIN,
    PROJECT,
    REPO,
    WORKERS,
    completed,
    wait_presence,
    wait_status,
)

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import Artifact, ArtifactState, Iterate, JobState, Operation, Sequential
from flotta_mqtt.protocol import SessionClaim, topics
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

pytestmark = pytest.mark.integration

TIMEOUT = 30.0
SCHEDULERS = ("s0", "s1", "s2")
TAKEOVER_LIMIT = 10.0  # seconds: "within a few seconds", with room for a busy machine


class Cluster:
    """Scheduler processes of one name on one database, and workers, each logging to a
    file in `folder`; each scheduler in a folder of its own (its initiator's state)."""

    def __init__(self, broker_url: str, database: str, folder: Path) -> None:
        self.broker_url, self.database, self.folder = broker_url, database, folder
        self.storage = (folder / "store").as_uri()
        self.config = folder / "scheduler.yaml"
        self.config.write_text(f"initiator_plugins: [{PLUGIN}]\nworker_grace: 10\n")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTTA_")}
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )

    def _start(self, name: str, args: list[str], cwd: Path) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        common = ["--broker", self.broker_url, "--storage", self.storage, "--log-level", "INFO"]
        with (self.folder / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "flotta_mqtt.cli", *args, *common],
                cwd=cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def scheduler(self, name: str) -> None:
        args = ["scheduler", "--config", str(self.config), "--database", self.database]
        self._start(name, args, self.folder / name)

    def worker(self, name: str) -> None:
        data = self.folder / f"{name}.csv"
        data.write_text("x\n1\n")
        state = str(self.folder / "state" / name)
        args = ["worker", "--name", name, "--data", f"{PROJECT}={data}", "--plugin", PLUGIN]
        self._start(name, [*args, "--state-dir", state], self.folder)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT)

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}.log\n{(self.folder / f'{name}.log').read_text()[-2500:]}"
            for name in self.processes
        )


@pytest.fixture
def cluster(broker: LocalBroker, postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(broker.url, postgres_url, tmp_path)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def claims(broker: LocalBroker) -> Iterator[MessageRecorder]:
    """Every claim on the scheduler's identity: who leads, as the bus sees it."""
    recorder = MessageRecorder()
    watch = Bus(
        client_id="failover-observer",
        settings=BrokerSettings(url=broker.url),
        on_message=recorder,
        subscriptions=[topics.session("scheduler")],
        clean=True,
    ).start(wait=TIMEOUT)
    try:
        yield recorder
    finally:
        watch.stop()


def leader_pid(claims: MessageRecorder, other_than: int | None = None) -> int:
    """The pid of the process that claims the scheduler's identity (a new one, when
    `other_than` is given), once it has."""

    def leading(messages: list[tuple[str, bytes]]) -> list[SessionClaim]:
        claimed = [(topic, payload) for topic, payload in messages if payload]  # not cleared
        found: list[SessionClaim] = messages_of(claimed, SessionClaim)
        return [claim for claim in found if claim.pid != other_than]

    return leading(claims.wait_for(leading, TIMEOUT, "no scheduler took the lead"))[-1].pid


def test_standby_schedulers_take_over_killed_leaders_and_lose_no_job(
    cluster: Cluster, claims: MessageRecorder
) -> None:
    for name in SCHEDULERS:
        cluster.scheduler(name)
    for name in WORKERS:
        cluster.worker(name)
    pid = leader_pid(claims)
    by_pid = {process.pid: name for name, process in cluster.processes.items()}
    with Client(
        BrokerSettings(url=cluster.broker_url),
        storage=StorageSettings(url=cluster.storage),
        resend_interval=1.0,
    ) as client:
        wait_presence(client, [*WORKERS, INITIATOR])
        # Rounds of initiator → w0 → w1 → w2 → initiator, one job after another; each
        # local job writes a ledger line and adds 1: the result counts each local job once.
        ledger = cluster.folder / "ledger"
        once = Operation(name="once", params={"ledger": str(ledger), "seconds": 0.1})
        rounds = 8
        artifact = Artifact(project=PROJECT, steps=[Iterate(rounds, [Sequential(once)])])
        handle = client.submit(artifact)
        takeovers: list[float] = []  # kill → the new leader's claim
        progress: list[float] = []  # kill → the next job completed, as its status says
        for kills in range(1, 4):
            before = wait_status(
                handle, lambda s, k=kills: completed(s) >= 8 * k, f"passed {8 * kills}"
            )
            leader = by_pid[pid]
            killed_at = time.monotonic()
            cluster.kill(leader)
            pid = leader_pid(claims, other_than=pid)
            takeovers.append(time.monotonic() - killed_at)
            cluster.scheduler(leader)  # back, as a standby
            by_pid[cluster.processes[leader].pid] = leader
            done = max(completed(before), completed(handle.status() or before))
            status = wait_status(handle, lambda s, n=done: completed(s) > n, "went on")
            progress.append(time.monotonic() - killed_at)
            assert status.state is ArtifactState.RUNNING, cluster.logs()
        assert handle.result(timeout=TIMEOUT) == rounds * len(WORKERS), cluster.logs()
    print(
        f"\ntakeover after SIGKILL: the new leader's claim "
        f"{', '.join(f'{t:.2f}' for t in takeovers)} s; the next job completed "
        f"{', '.join(f'{t:.2f}' for t in progress)} s"
    )
    assert max(takeovers) < TAKEOVER_LIMIT, takeovers

    with psycopg.connect(cluster.database) as db:
        states = db.execute(
            "SELECT job_id, state FROM jobs WHERE artifact_id = %s ORDER BY job_id",
            (artifact.id,),
        ).fetchall()
    total = rounds * 5  # 5 jobs a round: init, w0-w2, aggregate
    assert states == [(j, JobState.COMPLETED) for j in range(total)]
    local = sorted(j for j in range(total) if j % 5 not in (0, 4))
    lines = [line.split() for line in ledger.read_text().splitlines()]
    executed = sorted(int(job) for _, artifact_id, job in lines if artifact_id == artifact.id)
    assert executed == local, "some local job ran twice or never"


def test_a_leader_cut_off_from_its_database_stops_and_a_standby_carries_on(
    cluster: Cluster, claims: MessageRecorder
) -> None:
    """Its lease connection terminated (as a network cut or an operator would): it stops
    at once, exit code 4 and one line saying why; the standby takes the artifact on."""
    for name in SCHEDULERS[:2]:
        cluster.scheduler(name)
    for name in WORKERS:
        cluster.worker(name)
    pid = leader_pid(claims)
    leader = next(name for name, process in cluster.processes.items() if process.pid == pid)
    with Client(
        BrokerSettings(url=cluster.broker_url),
        storage=StorageSettings(url=cluster.storage),
        resend_interval=1.0,
    ) as client:
        wait_presence(client, [*WORKERS, INITIATOR])
        ledger = cluster.folder / "ledger"
        once = Operation(name="once", params={"ledger": str(ledger), "seconds": 0.1})
        artifact = Artifact(project=PROJECT, steps=[Iterate(4, [Sequential(once)])])
        handle = client.submit(artifact)
        wait_status(handle, lambda s: completed(s) >= 6, "passed 6 jobs")
        with psycopg.connect(cluster.database, autocommit=True) as db:
            ended = db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND granted AND database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database())"
            ).fetchall()
        assert len(ended) == 1
        assert cluster.processes[leader].wait(timeout=TIMEOUT) == 4, cluster.logs()
        assert leader_pid(claims, other_than=pid) != pid
        assert handle.result(timeout=TIMEOUT) == 4 * len(WORKERS), cluster.logs()
    log = (cluster.folder / f"{leader}.log").read_text()
    # Its lease check noticed, or its next commit met the new leader's epoch: either way,
    assert "it publishes nothing more and stops" in log
    lines = [line.split() for line in ledger.read_text().splitlines()]
    executed = sorted(int(job) for _, artifact_id, job in lines if artifact_id == artifact.id)
    assert executed == sorted(j for j in range(20) if j % 5 not in (0, 4))
