"""Real node processes for the fault tests: a scheduler and workers, some in a namespace.

Nodes run as `python -m flotta_mqtt.cli scheduler|worker`, exactly as deployed, with the
test operations (`tests.plugins.test_ops`, `tests.faults.fault_ops`) loaded as plugins; a
worker given a `Netns` runs inside it (`ip netns exec`), and reaches the broker at the
URL it is given (the broker's listener on the host end of the veth pair, or a proxy).
Each node logs to `<name>.log` in the test's folder; `logs()` gathers their tails for
assertion messages.

`Observer` is a bus client in the test process that records what it is subscribed to
(presence, job dispatches, events), so a test waits for what happened, never a sleep.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from helpers import MessageRecorder, decoded
from netns import Netns

from flotta_mqtt.cli.demo import count_artifact
from flotta_mqtt.client.client import ArtifactFailed, ArtifactHandle, Client
from flotta_mqtt.model import (
    Artifact,
    Collect,
    Finalize,
    Iterate,
    JobState,
    Operation,
    Parallel,
    Sequential,
)
from flotta_mqtt.protocol import ArtifactStatus, JobReady, NodePresence, topics
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

REPO = Path(__file__).resolve().parents[2]
PLUGINS = ("tests.plugins.test_ops", "tests.faults.fault_ops")
PROJECT = "demo"  # count_artifact() is the seed's example on project "demo"
WORKERS = ("w0", "w1", "w2")
INITIATOR = "scheduler.initiator"
ROWS = {"w0": 83, "w1": 150, "w2": 211}  # uneven: a count off by one worker's share fails
TIMEOUT = 30.0  # node processes start in about a second, more on a busy machine

# Re-sends every second instead of every 5 s (the default): a fault costs the tests at
# most one interval to recover from, and the re-send paths run more often.
SCHEDULER_CONFIG = """\
initiator_plugins: [{plugins}]
worker_grace: 10
resend_interval: 1
"""
WORKER_CONFIG = """\
broker: {{keepalive: {keepalive}}}
resend_interval: 1
heartbeat_interval: 1
max_jobs: {max_jobs}
"""


class Cluster:
    """Node processes on one broker and one file store, each logging to a file in `folder`."""

    def __init__(self, broker_url: str, folder: Path, broker_log: Path | None = None) -> None:
        self.broker_url = broker_url
        self.broker_log = broker_log  # mosquitto's log (connections), for failure messages
        self.folder = folder
        self.storage = (folder / "store").as_uri()
        self.database = folder / "scheduler.db"
        self.ledger = folder / "ledger"
        self.flag = folder / "go"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTTA_")}
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        self._scheduler_config = folder / "scheduler.yaml"
        self._scheduler_config.write_text(SCHEDULER_CONFIG.format(plugins=", ".join(PLUGINS)))
        rng = random.Random(1729)
        self.data: dict[str, Path] = {}
        for name, rows in ROWS.items():
            path = folder / f"{name}.csv"
            lines = [f"{rng.random():.6f},{rng.gauss(0, 1):.6f}" for _ in range(rows)]
            path.write_text("x,y\n" + "\n".join(lines) + "\n")
            self.data[name] = path

    # --- processes ------------------------------------------------------------------------

    def _start(
        self, name: str, args: list[str], url: str, netns: Netns | None = None
    ) -> subprocess.Popen[bytes]:
        running = self.processes.get(name)
        assert running is None or running.poll() is not None, f"{name} is already running"
        command = [sys.executable, "-m", "flotta_mqtt.cli", *args]
        command += ["--broker", url, "--storage", self.storage, "--log-level", "INFO"]
        if netns is not None:
            command = netns.command(command)
        with (self.folder / f"{name}.log").open("ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} starting {name}\n".encode())
            log.flush()
            process = subprocess.Popen(
                # In the test's folder: whatever a node writes to a relative default path
                # stays there. PYTHONPATH finds the code and the test plugins.
                command,
                cwd=self.folder,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes[name] = process
        return process

    def scheduler(self) -> None:
        """Start the scheduler on `self.database` (a test may point it elsewhere)."""
        args = ["scheduler", "--config", str(self._scheduler_config)]
        self._start("scheduler", [*args, "--database", str(self.database)], self.broker_url)

    def worker(
        self,
        name: str,
        *,
        netns: Netns | None = None,
        url: str | None = None,
        keepalive: int = 15,
        max_jobs: int = 2,
        state_dir: Path | None = None,
    ) -> None:
        """Start worker `name` holding its CSV; in `netns` if given, reaching `url`.

        Its journal (held jobs, unacknowledged results) lives in `state_dir`, by default
        `<name>.state` in the test's folder: never the CLI's default under the current
        directory, which would carry one test's jobs into the next.
        """
        config = self.folder / f"{name}.yaml"
        text = WORKER_CONFIG.format(keepalive=keepalive, max_jobs=max_jobs)
        text += f"state_dir: {state_dir or self.folder / f'{name}.state'}\n"
        config.write_text(text)
        args = ["worker", "--name", name, "--config", str(config)]
        args += ["--data", f"{PROJECT}={self.data[name]}", "--exact", PROJECT]
        for plugin in PLUGINS:
            args += ["--plugin", plugin]
        self._start(name, args, url or self.broker_url, netns)

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

    def client(self) -> Client:
        """A workbench in the test process (use it as a context manager)."""
        return Client(
            BrokerSettings(url=self.broker_url),
            storage=StorageSettings(url=self.storage),
            resend_interval=1.0,
        )

    def wait(self, predicate: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
        """`wait_for`, failing with the nodes' logs: what they said is the evidence."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"{what} (waited {timeout} s)\n{self.logs()}")
            time.sleep(0.01)

    def result(self, handle: ArtifactHandle, timeout: float = TIMEOUT) -> Any:
        """The artifact's result; on a timeout or a failure, fail with the nodes' logs."""
        try:
            return handle.result(timeout=timeout)
        except (TimeoutError, ArtifactFailed) as exc:
            pytest.fail(f"{exc}\n{self.logs()}")

    def logs(self, tail: int = 4000) -> str:
        """The tail of each node's log and of the broker's, for assertion messages."""
        logs = {name: self.folder / f"{name}.log" for name in self.processes}
        if self.broker_log is not None:
            logs["mosquitto"] = self.broker_log
        return "\n".join(
            f"--- {name} log\n{path.read_text(errors='replace')[-tail:] if path.exists() else ''}"
            for name, path in logs.items()
        )

    # --- data and truth ---------------------------------------------------------------------

    def expected_count(self, names: Iterable[str] = WORKERS) -> int:
        """The seed example's answer computed directly on the data: rows with x > 0.5."""
        total = 0
        for name in names:
            rows = self.data[name].read_text().splitlines()[1:]
            total += sum(1 for row in rows if float(row.split(",")[0]) > 0.5)
        return total

    def ledger_lines(self, artifact_id: str | None = None) -> list[tuple[str, int, str]]:
        """(node, job, start|end) for every line the gated/once operations wrote."""
        if not self.ledger.exists():
            return []
        lines = []
        for line in self.ledger.read_text().splitlines():
            node, artifact, job, *what = line.split()
            if artifact_id is None or artifact == artifact_id:
                lines.append((node, int(job), what[0] if what else "once"))
        return lines

    def job_rows(self, artifact_id: str) -> list[tuple[int, str, str, int]]:
        """(job, worker, state, attempt) of each job, as the scheduler's database holds them."""
        with closing(sqlite3.connect(self.database)) as db:
            rows: list[tuple[int, str, str, int]] = db.execute(
                "SELECT job_id, worker, state, attempt FROM jobs WHERE artifact_id = ? "
                "ORDER BY job_id",
                (artifact_id,),
            ).fetchall()
        return rows


# --- artifacts ---------------------------------------------------------------------------------


def count_example() -> Artifact:
    """The seed's example: filter x > 0.5, count on every worker, sum on the initiator."""
    return count_artifact()


def gated(cluster: Cluster, flag: bool = True) -> Artifact:
    """Parallel faults.gated (held until the flag exists) → Collect → Finalize: = #workers."""
    params: dict[str, str] = {"ledger": str(cluster.ledger)}
    if flag:
        params["flag"] = str(cluster.flag)
    return Artifact(
        project=PROJECT,
        steps=[
            Parallel(
                operation=Operation(name="faults.gated", params=params), distribution=Collect()
            ),
            Finalize(
                operation=Operation(name="faults.gated", params={"ledger": str(cluster.ledger)})
            ),
        ],
    )


def once_rounds(cluster: Cluster, rounds: int) -> Artifact:
    """`rounds` rounds of initiator → w0 → w1 → w2 → initiator running `once`: = rounds * 3."""
    once = Operation(name="once", params={"ledger": str(cluster.ledger)})
    return Artifact(project=PROJECT, steps=[Iterate(rounds, [Sequential(operation=once)])])


def once_parallel(cluster: Cluster) -> Artifact:
    """Parallel `once` → Collect → Finalize: = #workers, one ledger line per worker job."""
    once = Operation(name="once", params={"ledger": str(cluster.ledger)})
    return Artifact(
        project=PROJECT,
        steps=[Parallel(operation=once, distribution=Collect()), Finalize(operation=once)],
    )


# --- watching ----------------------------------------------------------------------------------


class Observer:
    """A clean-session bus client recording every message on `subscriptions`."""

    def __init__(
        self,
        broker_url: str,
        subscriptions: list[str],
        details: Callable[[], str] = str,
        name: str = "fault-observer",
    ) -> None:
        self.details = details  # more to say when a wait fails: the nodes' logs
        self.messages = MessageRecorder()
        self.bus = Bus(
            client_id=name,
            settings=BrokerSettings(url=broker_url),
            on_message=self.messages,
            subscriptions=subscriptions,
            clean=True,
        ).start(wait=TIMEOUT)

    def close(self) -> None:
        self.bus.stop()

    def __enter__(self) -> Observer:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def decoded(self, since: int = 0) -> list[object]:
        return [message for _, message in decoded(self.messages.messages[since:])]

    def mark(self) -> int:
        """The number of messages so far: pass it as `since` to look only at what follows."""
        return len(self.messages.messages)

    def presence(self, node: str, since: int = 0) -> list[bool]:
        return [
            m.online for m in self.decoded(since) if isinstance(m, NodePresence) and m.node == node
        ]

    def wait_presence(
        self, nodes: Iterable[str], online: bool, since: int = 0, timeout: float = TIMEOUT
    ) -> float:
        """Block until each node's latest presence since `since` is `online`; return seconds."""
        names = list(nodes)
        started = time.monotonic()

        def settled(_: object) -> bool:
            return all((seen := self.presence(n, since)) and seen[-1] is online for n in names)

        try:
            self.messages.wait_for(
                settled, timeout, f"{names} never {'online' if online else 'offline'}"
            )
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\n{self.details()}")
        return time.monotonic() - started

    def dispatches(self, worker: str, since: int = 0) -> list[JobReady]:
        """The JobReady messages sent to `worker` (the observer must subscribe to them)."""
        wanted = topics.jobs(worker)
        return [
            message
            for topic, message in decoded(self.messages.messages[since:])
            if topic == wanted and isinstance(message, JobReady)
        ]


def wait_status(
    cluster: Cluster,
    handle: ArtifactHandle,
    predicate: Callable[[ArtifactStatus], bool],
    what: str,
    timeout: float = TIMEOUT,
) -> ArtifactStatus:
    def settled() -> bool:
        status = handle.status()
        return status is not None and predicate(status)

    cluster.wait(settled, f"artifact {handle.artifact_id} never {what}", timeout)
    status = handle.status()
    assert status is not None
    return status


def completed(status: ArtifactStatus) -> int:
    return status.counts.get(JobState.COMPLETED, 0)


class Stopwatch:
    """Named durations, printed at the end of the test (run pytest with -s to see them)."""

    def __init__(self, test: str) -> None:
        self.test = test
        self.start = time.monotonic()
        self.marks: dict[str, float] = {}

    def lap(self, name: str) -> float:
        self.marks[name] = time.monotonic() - self.start
        return self.marks[name]

    def report(self) -> str:
        laps = ", ".join(f"{name} @{t:.2f}s" for name, t in self.marks.items())
        return f"[faults] {self.test}: {laps}"
