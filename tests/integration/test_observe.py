"""Seeing the work from the command line and the SDK: `status`, `watch`, `graph`, `workers`,
`logs`, `handle.graph()`, and the scheduler's Prometheus metrics, against a real mosquitto
with an in-process scheduler and three workers.

A live artifact is held mid-way by the `slow` test operation waiting for a flag file.
`watch` runs as a real process (`COLUMNS` set, output piped: its line-per-change mode)
while the artifact is held and then released.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_for
from rich.console import Console
from typer.testing import CliRunner, Result

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.local import free_port
from flotta_mqtt.cli.main import app
from flotta_mqtt.cli.views import watch_view
from flotta_mqtt.client.client import Client
from flotta_mqtt.client.graph import GraphImage, GraphTooLarge, graphviz_available
from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    Collect,
    Compare,
    Finalize,
    JobState,
    Operation,
    Parallel,
)
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "tests.plugins.test_ops"
WORKERS = ("node-a", "node-b", "node-c")
TIMEOUT = 20.0
SIZES = (40, 55, 70)
WHERE = Compare(column="x", op=">", value=0.5).model_dump()
# The seed's example: count x > 0.5 on every worker, collected and summed on the initiator.
COUNT = [
    Parallel(Operation(name="count", params={"where": WHERE}), Collect()),
    Finalize(Operation(name="count")),
]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"}, catch_exceptions=False)


def flat(text: str) -> str:
    return " ".join(text.split())


@dataclass
class Running:
    broker_url: str
    storage: str
    client: Client
    scheduler: SchedulerNode
    metrics_url: str
    rows: dict[str, int]

    def args(self) -> list[str]:
        return ["--broker", self.broker_url]


@pytest.fixture
def running(broker: LocalBroker, tmp_path: Path) -> Iterator[Running]:
    """A scheduler (metrics on), three workers and a workbench that saw them online."""
    rng = random.Random(5)
    settings = BrokerSettings(url=broker.url)
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    nodes: list[SchedulerNode | WorkerAgent] = []
    rows: dict[str, int] = {}
    try:
        config = SchedulerConfig(
            broker=settings,
            storage=storage,
            database=tmp_path / "scheduler.db",
            initiator_plugins=[PLUGIN],
            metrics_port=free_port(),
            retry_backoff=0.05,
        )
        scheduler = SchedulerNode(config).start(wait=TIMEOUT)
        nodes.append(scheduler)
        for name, size in zip(WORKERS, SIZES, strict=True):
            path = tmp_path / f"{name}.csv"
            path.write_text("x\n" + "".join(f"{rng.random()!r}\n" for _ in range(size)))
            rows[name] = size
            worker = WorkerConfig(
                name=name,
                broker=settings,
                storage=storage,
                datasets={"demo": {"paths": [path], "privacy": {"exact": True}}},
                plugins=[PLUGIN],
                state_dir=tmp_path / f"{name}.state",
            )
            nodes.append(WorkerAgent(worker).start(wait=TIMEOUT))
        with Client(settings, storage=storage) as client:
            names = {*WORKERS, config.initiator}
            wait_for(
                lambda: names <= {p.node for p in client.workers() if p.online},
                timeout=TIMEOUT,
                message="the nodes never came online",
            )
            metrics = f"http://127.0.0.1:{config.metrics_port}/metrics"
            yield Running(broker.url, storage.url, client, scheduler, metrics, rows)
    finally:
        for node in reversed(nodes):
            node.stop()


def held(flag: Path) -> Artifact:
    """Every worker's job waits for `flag`; the final job then runs at once."""
    return Artifact(
        project="demo",
        steps=[
            Parallel(Operation(name="slow", params={"flag": str(flag)}), Collect()),
            Finalize(Operation(name="slow")),
        ],
    )


class Watcher:
    """`flotta-mqtt watch ID` as a process, its output read line by line as it comes."""

    def __init__(self, artifact_id: str, running: Running) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "flotta_mqtt.cli", "watch", artifact_id),
                *(*running.args(), "--timeout", str(TIMEOUT)),
            ],
            cwd=REPO,
            env={**os.environ, "COLUMNS": "200"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def finish(self) -> tuple[int, str]:
        code = self.process.wait(timeout=TIMEOUT)
        self._reader.join(timeout=5)
        return code, "\n".join(self.lines)


def test_status_watch_and_workers_follow_a_live_artifact(running: Running, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    artifact = held(flag)
    handle = running.client.submit(artifact)
    try:
        wait_for(
            lambda: (
                (s := handle.status()) is not None
                and s.counts.get(JobState.RUNNING, 0) == len(WORKERS)
            ),
            timeout=TIMEOUT,
            message="the workers' jobs never started",
        )
        watcher = Watcher(artifact.id, running)
        wait_for(lambda: watcher.lines, timeout=TIMEOUT, message="watch printed nothing")

        # status: the job table, mid-way.
        result = invoke("status", artifact.id, *running.args())
        assert result.exit_code == 0, result.output
        table = [line for line in result.output.splitlines() if "│" in line]
        for name in WORKERS:
            row = next(line for line in table if f" {name} " in line)
            assert "running" in row and " 1 " in row  # state and attempt
        result = invoke("status", artifact.id, "--output", "json", *running.args())
        status = json.loads(result.output)
        assert status["state"] == "running"
        assert sorted(map(tuple, status["locks"])) == [(0, 3), (1, 3), (2, 3)]
        assert [job["state"] for job in status["jobs"]] == ["running"] * 3 + ["waiting"]

        # workers: each worker runs one job; its dataset's rows are announced.
        result = invoke("workers", *running.args())
        assert result.exit_code == 0, result.output
        for name in WORKERS:
            row = next(line for line in result.output.splitlines() if f" {name} " in line)
            assert f"demo ({running.rows[name]} rows, 1 columns)" in row
            assert row.rstrip(" │").endswith(" 1"), row  # the running column
        result = invoke("workers", "--output", "json", *running.args())
        nodes = {node["node"]: node for node in json.loads(result.output)}
        assert {name: nodes[name]["running_jobs"] for name in WORKERS} == dict.fromkeys(WORKERS, 1)
        assert nodes["scheduler.initiator"]["running_jobs"] == 0

        flag.touch()
        code, output = watcher.finish()
    finally:
        flag.touch()
    assert code == 0, output
    lines = output.splitlines()
    # The first line was printed while the workers' jobs were held, the last once done.
    assert "running 0/4 completed | step 0: 0/3 step 1: 0/1 (" in lines[0], lines[0]
    assert "running 3" in lines[0] and "waiting 1" in lines[0]
    summary = [line for line in lines if re.match(r"\d\d:\d\d:\d\d ", line)]
    assert "completed 4/4 completed | step 0: 3/3 step 1: 1/1" in summary[-1]
    assert len(summary) >= 2
    text = flat(output)
    assert f"artifact {artifact.id} completed 4/4 jobs completed" in text
    assert "by step" in text and "by worker" in text
    for name in (*WORKERS, "scheduler.initiator"):
        assert name in text


def test_watch_renders_per_step_and_per_worker_views(running: Running) -> None:
    """The live (terminal) view is the same renderable: check what it shows."""
    handle = running.client.submit(Artifact(project="demo", steps=COUNT))
    status = handle.wait(timeout=TIMEOUT)
    console = Console(record=True, width=160, force_terminal=False)
    console.print(watch_view(status, started=0.0))
    text = console.export_text()
    assert "completed 4/4 jobs completed" in flat(text)
    steps = [line for line in text.splitlines() if re.match(r"│ [01] ", line)]
    assert len(steps) == 2 and "3/3" in steps[0] and "1/1" in steps[1]
    for name in WORKERS:
        assert re.search(rf"│ {name} +│ 1 +│ 0 +│ 1 +│ 0 ", text), text


def test_watch_fails_and_logs_show_the_error_of_a_failed_artifact(running: Running) -> None:
    artifact = Artifact(
        project="demo",
        steps=[
            Parallel(Operation(name="boom", params={"message": "[bad] input"}), Collect()),
            Finalize(Operation(name="count")),
        ],
    )
    running.client.submit(artifact).wait(timeout=TIMEOUT)
    result = invoke("watch", artifact.id, *running.args())
    assert result.exit_code == 1, result.output
    assert "ValueError: boom: [bad] input" in flat(result.output)
    result = invoke("logs", artifact.id, "--storage", running.storage, *running.args())
    assert result.exit_code == 0, result.output
    assert "error (attempt 1)" in result.output
    assert "ValueError: boom: [bad] input" in result.output
    result = invoke("logs", artifact.id, "nope", "--storage", running.storage, *running.args())
    assert result.exit_code == 2 and "has no task 'nope'" in flat(result.output)


def _classes(element: ET.Element) -> set[str]:
    return set(element.get("class", "").split())


@pytest.mark.parametrize("engine", ["python", "graphviz"])
def test_graph_of_the_count_example_is_a_valid_svg(
    running: Running, tmp_path: Path, engine: str
) -> None:
    if engine == "graphviz" and not graphviz_available():
        pytest.skip("Graphviz is not installed (broker/install.sh test installs it)")
    handle = running.client.submit(Artifact(project="demo", steps=COUNT))
    status = handle.wait(timeout=TIMEOUT)
    assert status.jobs is not None and status.locks is not None
    target = tmp_path / "count.svg"
    result = invoke(
        "graph", status.artifact_id, "-o", str(target), "--engine", engine, *running.args()
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {target} (svg, 4 jobs, 3 locks)" in flat(result.output)
    root = ET.parse(target).getroot()  # well-formed XML, or this raises
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    nodes = [e for e in root.iter() if "job" in _classes(e)]
    edges = [e for e in root.iter() if "lock" in _classes(e)]
    assert len(nodes) == len(status.jobs) == 4
    assert len(edges) == len(status.locks) == 3
    assert all("completed" in _classes(node) for node in nodes)
    ids = sorted(int((node.get("id") or "").removeprefix("job-")) for node in nodes)
    assert ids == [job.id for job in status.jobs]
    if engine == "python":
        drawn = sorted((int(e.get("data-from", -1)), int(e.get("data-to", -1))) for e in edges)
        assert drawn == sorted(status.locks)


def test_graph_formats_and_the_sdk_picture(running: Running, tmp_path: Path) -> None:
    handle = running.client.submit(Artifact(project="demo", steps=COUNT))
    status = handle.wait(timeout=TIMEOUT)
    artifact_id = status.artifact_id

    result = invoke("graph", artifact_id, "--format", "dot", "-o", "-", *running.args())
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f'digraph "{artifact_id}"')
    assert result.output.count(" -> ") == 3 and result.output.count('class="job completed"') == 4
    result = invoke("graph", artifact_id, "-f", "mermaid", "-o", "-", *running.args())
    assert result.output.startswith("flowchart LR") and result.output.count(" --> ") == 3
    target = tmp_path / "count.png"
    result = invoke("graph", artifact_id, "-o", str(target), *running.args())
    if graphviz_available():
        assert result.exit_code == 0, result.output
        assert target.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    else:
        assert result.exit_code == 2 and "PNG needs Graphviz" in flat(result.output)
    result = invoke("graph", "never-submitted", *running.args())
    assert result.exit_code == 2 and "no status for artifact never-submitted" in result.output

    picture = handle.graph(engine="python")
    assert isinstance(picture, GraphImage)
    assert picture._repr_svg_().startswith("<svg")
    bundle = picture._repr_mimebundle_()
    assert (
        set(bundle) == {"image/svg+xml", "text/plain"} and "4 jobs, 3 locks" in bundle["text/plain"]
    )
    assert picture.save(tmp_path / "dag.mmd").read_text().startswith("flowchart LR")
    with pytest.raises(LookupError):
        running.client.handle("never-submitted").graph(timeout=2)


def test_graph_of_an_artifact_too_large_to_list_says_so(running: Running) -> None:
    # 4 jobs would be listed; a status of a big artifact has no jobs: fake one by hand.
    from flotta_mqtt.client.graph import JobDag
    from flotta_mqtt.protocol import ArtifactStatus

    big = ArtifactStatus(
        artifact_id="big",
        project="demo",
        state=ArtifactState.RUNNING,
        seq=1,
        total=5000,
        counts={JobState.COMPLETED: 4000, JobState.RUNNING: 1000},
        updated_at=1.0,
    )
    with pytest.raises(GraphTooLarge, match="has 5000 jobs: too large to draw"):
        JobDag.from_status(big)


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_count_the_jobs_run(running: Running, tmp_path: Path) -> None:
    before = _metrics(running.metrics_url)
    assert before["flotta_jobs_dispatched_total"] == 0
    handle = running.client.submit(Artifact(project="demo", steps=COUNT))
    assert handle.wait(timeout=TIMEOUT).state is ArtifactState.COMPLETED
    jobs = len(WORKERS) + 1
    after = _metrics(running.metrics_url)
    assert after["flotta_jobs_dispatched_total"] == jobs
    assert after["flotta_jobs_completed_total"] == jobs
    assert after["flotta_jobs_failed_total"] == 0
    assert after["flotta_jobs_retried_total"] == 0
    assert after["flotta_job_duration_seconds_count"] == jobs
    assert after['flotta_job_duration_seconds_bucket{le="+Inf"}'] == jobs
    # Quick jobs send no JobStarted: their results count their starts.
    assert after["flotta_jobs_started_total"] == jobs
    assert after["flotta_dispatch_latency_seconds_count"] == jobs
    assert after['flotta_artifacts_total{state="submitted"}'] == 1
    assert after['flotta_artifacts_total{state="completed"}'] == 1
    assert after['flotta_artifacts{state="running"}'] == 0
    assert after['flotta_jobs{state="running"}'] == 0

    # One attempt fails and is retried (the `flaky` counter is shared by the workers).
    flag = tmp_path / "go"
    flaky = Operation(name="flaky", params={"counter": str(tmp_path / "count"), "flag": str(flag)})
    artifact = Artifact(
        project="demo",
        steps=[Parallel(flaky, Collect(), retries=1), Finalize(Operation(name="slow"))],
    )
    handle = running.client.submit(artifact)
    try:
        wait_for(
            lambda: (
                (s := handle.status()) is not None
                and s.counts.get(JobState.RUNNING, 0) == len(WORKERS)
            ),
            timeout=TIMEOUT,
            message="the flaky jobs never all ran",
        )
        held = _metrics(running.metrics_url)
        depth = {w: held[f'flotta_worker_queue_depth{{worker="{w}"}}'] for w in WORKERS}
        assert depth == dict.fromkeys(WORKERS, 1)
        assert held['flotta_artifacts{state="running"}'] == 1
        assert held['flotta_jobs{state="running"}'] == len(WORKERS)
    finally:
        flag.touch()
    assert handle.wait(timeout=TIMEOUT).state is ArtifactState.COMPLETED
    final = _metrics(running.metrics_url)
    assert final["flotta_jobs_retried_total"] == 1
    assert final["flotta_jobs_dispatched_total"] == 2 * jobs + 1
    assert final["flotta_jobs_completed_total"] == 2 * jobs
    assert final['flotta_artifacts_total{state="completed"}'] == 2


def test_next_status_waits_for_news(running: Running, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    handle = running.client.submit(held(flag))
    try:
        first = handle.next_status(timeout=TIMEOUT)
        assert first is not None
        assert handle.next_status(first.seq + 1000, timeout=0.2) is None
    finally:
        flag.touch()
    last = handle.wait(timeout=TIMEOUT)
    assert handle.next_status(first.seq, timeout=1) is not None and last.seq > first.seq
