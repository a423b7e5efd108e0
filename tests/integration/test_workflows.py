"""Workflows end to end: workflow files submitted to an in-process scheduler whose workers
run shell tasks, on a real mosquitto, with job files in a local store or on a real S3 API.

The issue's acceptance, one test each: the diamond (concurrency proved from the recorded
start and finish times), refusal of bad files before anything runs, retries then failure
that stops only descendants, a timeout that kills the task's children, logs through the
CLI, the diamond on S3, and a worker without the shell executor never getting a shell task.
Then a replicated task: each replica told its index, its dependent run after all of them.
"""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import s3fs
import yaml
from helpers import wait_for
from moto.server import ThreadedMotoServer
from typer.testing import CliRunner, Result

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.cli.main import app
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import ArtifactState, JobState
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import ArtifactStatus, JobSummary
from flotta_mqtt.scheduler.config import LISTED_JOBS, SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import RESULTS_MANIFEST, ResourceStore
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig
from flotta_mqtt.workflows.executors import SitePolicy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0
SHELL_WORKERS = ("w0", "w1")

# a → (b, c) → d: b and c each take PAUSE seconds, so they overlap only if run concurrently.
PAUSE = 0.8
DIAMOND = {
    "name": "diamond",
    "tasks": [
        {"name": "a", "params": {"shell": "seq 1 10 > numbers.txt"}, "outputs": ["numbers.txt"]},
        {
            "name": "b",
            "depends": ["a"],
            "params": {
                "shell": f"sleep {PAUSE}; awk '{{s+=$1}} END {{print s}}' numbers.txt > sum"
            },
            "inputs": ["numbers.txt"],
            "outputs": ["sum"],
        },
        {
            "name": "c",
            "depends": ["a"],
            "params": {
                "command": ["sh", "-c", f"mkdir n; sleep {PAUSE}; wc -l < numbers.txt > n/count"]
            },
            "inputs": ["numbers.txt"],
            "outputs": ["n/count"],
        },
        {
            "name": "d",
            "depends": ["b", "c"],
            "params": {"shell": 'echo "sum=$(cat sum) count=$(cat n/count) $WHO"; echo done >&2'},
            "env": {"WHO": "from d"},
            "inputs": ["sum", "n/count"],
        },
    ],
}
D_SAYS = "sum=55 count=10 from d"

# Starts a child that would outlive the task, writes both PIDs, then waits for it.
SPAWNS_A_CHILD = 'sleep 300 & echo $! > "$PIDS"; echo $$ >> "$PIDS"; wait'


# --- in-process nodes -----------------------------------------------------------------------------


@dataclass
class Flotta:
    """A scheduler and workers against one broker and store; stops them all at the end."""

    broker_url: str
    folder: Path
    storage: StorageSettings
    running: list[SchedulerNode | WorkerAgent | Client] = field(default_factory=list)
    scheduler_node: SchedulerNode | None = None
    client: Client | None = None

    @property
    def broker(self) -> BrokerSettings:
        return BrokerSettings(url=self.broker_url)

    @property
    def database(self) -> Path:
        return self.folder / "scheduler.db"

    def start(self, workers: dict[str, list[str]], policy: SitePolicy | None = None) -> Client:
        """A scheduler, workers by name → executors (under `policy`, else the default one),
        and a client that has seen them online."""
        self.scheduler_node = SchedulerNode(
            SchedulerConfig(
                broker=self.broker,
                storage=self.storage,
                database=self.database,
                worker_grace=0.5,
                retry_backoff=0.05,
            )
        ).start(wait=TIMEOUT)
        self.running.append(self.scheduler_node)
        for name, executors in workers.items():
            config = WorkerConfig(
                name=name,
                broker=self.broker,
                storage=self.storage,
                executors=executors,
                policy=policy or SitePolicy(),
            )
            self.running.append(WorkerAgent(config).start(wait=TIMEOUT))
        client = self.client = Client(self.broker, storage=self.storage, resend_interval=1.0)
        self.running.append(client)
        wait_for(
            lambda: set(workers) <= {p.node for p in client.workers(TIMEOUT) if p.online},
            timeout=TIMEOUT,
            message=f"workers {sorted(workers)} not all online",
        )
        return client

    def close(self) -> None:
        for node in reversed(self.running):
            if isinstance(node, Client):
                node.close()
            else:
                node.stop()
        self.running.clear()

    def artifacts(self) -> list[str]:
        with sqlite3.connect(self.database) as db:
            return [row[0] for row in db.execute("SELECT id FROM artifacts")]

    def cli(self, *args: str) -> Result:
        """The CLI in-process, pointed at this broker (and store, where a command takes one)."""
        options = ["--broker", self.broker_url]
        if args[0] in ("submit", "logs", "download"):
            options += ["--storage", self.storage.url]
        return invoke(*args, *options)


def invoke(*args: str) -> Result:
    """Run the CLI in-process; a wide terminal so rich does not wrap what tests look for."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"}, catch_exceptions=False)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def flotta(broker: LocalBroker, tmp_path: Path) -> Iterator[Flotta]:
    nodes = Flotta(broker.url, tmp_path, StorageSettings(url=(tmp_path / "store").as_uri()))
    try:
        yield nodes
    finally:
        nodes.close()


def shell_cluster(flotta: Flotta) -> Client:
    """Two workers running shell tasks, and one (`plain`) that runs no executor at all."""
    return flotta.start({"w0": ["shell"], "w1": ["shell"], "plain": []})


def write_workflow(folder: Path, workflow: dict[str, Any], name: str = "workflow.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(workflow, sort_keys=False))
    return path


def submitted_id(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output.split("submitted artifact ")[1].split()[0]


def run_and_wait(flotta: Flotta, workflow: dict[str, Any]) -> ArtifactStatus:
    """Submit a workflow file with the CLI; wait for its final status."""
    artifact_id = submitted_id(flotta.cli("submit", str(write_workflow(flotta.folder, workflow))))
    assert flotta.client is not None
    return flotta.client.handle(artifact_id).wait(timeout=TIMEOUT)


def by_name(status: ArtifactStatus) -> dict[str, JobSummary]:
    assert status.jobs is not None, "a small artifact lists its jobs"
    return {job.name or "": job for job in status.jobs}


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (dead, only not reaped by PID 1)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- acceptance: the diamond ------------------------------------------------------------------


def check_diamond(status: ArtifactStatus) -> dict[str, JobSummary]:
    assert status.state is ArtifactState.COMPLETED, status.error
    jobs = by_name(status)
    assert sorted(jobs) == ["a", "b", "c", "d"]
    for job in jobs.values():
        assert (job.state, job.attempt, job.exit_code) == (JobState.COMPLETED, 1, 0)
        assert job.started_at is not None and job.finished_at is not None
    return jobs


def test_the_diamond_runs_on_two_workers_with_b_and_c_at_once(flotta: Flotta) -> None:
    shell_cluster(flotta)
    status = run_and_wait(flotta, DIAMOND)
    jobs = check_diamond(status)
    a, b, c, d = (jobs[name] for name in "abcd")
    assert b.started_at and b.finished_at and c.started_at and c.finished_at  # for mypy
    assert {job.worker for job in jobs.values()} == set(SHELL_WORKERS), "both workers, not plain"
    assert b.worker != c.worker, "b and c are spread over the two workers"
    # b and c overlap: each started before the other finished, though each took PAUSE s.
    assert max(b.started_at, c.started_at) < min(b.finished_at, c.finished_at), (
        f"b ran {b.started_at:.3f}..{b.finished_at:.3f}, c {c.started_at:.3f}..{c.finished_at:.3f}"
    )
    assert min(b.finished_at, c.finished_at) - max(b.started_at, c.started_at) > PAUSE / 2
    # ... and the dependencies held: b and c after a, d after both.
    assert a.finished_at and d.started_at
    assert a.finished_at <= min(b.started_at, c.started_at)
    assert d.started_at >= max(b.finished_at, c.finished_at)
    # d saw both outputs: its stdout (and stderr) are in the store, at the logs URL.
    store = ResourceStore(flotta.storage.url)
    artifact_id = status.artifact_id
    assert store.get_bytes(store.log_url(artifact_id, "d", 1, "stdout")) == f"{D_SAYS}\n".encode()
    assert store.get_bytes(store.log_url(artifact_id, "d", 1, "stderr")) == b"done\n"
    count = store.job_file_url(artifact_id, str(c.id), c.attempt, "n/count")
    assert store.get_bytes(count).strip() == b"10"
    # `flotta-mqtt logs ID TASK` prints a task's stdout (and stderr) from the store.
    result = flotta.cli("logs", artifact_id, "d")
    assert result.exit_code == 0, result.output
    assert D_SAYS in result.output and "done" in result.output
    assert "numbers" not in result.output, "only d's logs"
    everything = flotta.cli("logs", artifact_id)
    assert everything.exit_code == 0 and D_SAYS in everything.output
    missing = flotta.cli("logs", artifact_id, "zz")
    assert missing.exit_code != 0 and "zz" in missing.output
    # The status command lists every task with its worker, exit code and timing.
    listed = flotta.cli("status", artifact_id, "--output", "json")
    assert listed.exit_code == 0, listed.output
    assert ArtifactStatus.model_validate_json(listed.output).jobs == status.jobs


# --- acceptance: bad workflow files are refused before anything runs -----------------------------

BAD_WORKFLOWS = {
    "duplicates": (
        [
            {"name": "a", "params": {"shell": "true"}},
            {"name": "b", "params": {"shell": "true"}},
            {"name": "a", "params": {"shell": "touch RAN"}},
            {"name": "b", "params": {"shell": "touch RAN"}},
        ],
        "task names must be unique; repeated: a, b",
    ),
    "unknown": (
        [
            {"name": "a", "params": {"shell": "touch RAN"}},
            {"name": "b", "depends": ["a", "ghost"], "params": {"shell": "touch RAN"}},
        ],
        "tasks depend on tasks that do not exist: b → ghost",
    ),
    "cycle": (
        [
            {"name": "start", "params": {"shell": "touch RAN"}},
            {"name": "x", "depends": ["start", "z"], "params": {"shell": "touch RAN"}},
            {"name": "y", "depends": ["x"], "params": {"shell": "touch RAN"}},
            {"name": "z", "depends": ["y"], "params": {"shell": "touch RAN"}},
        ],
        "the tasks form a cycle: ",
    ),
}


def test_bad_workflows_are_refused_before_anything_runs(flotta: Flotta) -> None:
    shell_cluster(flotta)
    for kind, (tasks, culprits) in BAD_WORKFLOWS.items():
        path = write_workflow(flotta.folder, {"tasks": tasks}, f"{kind}.yaml")
        for command in ("validate", "submit"):
            result = (
                invoke(command, str(path))
                if command == "validate"
                else flotta.cli(command, str(path))
            )
            said = flat(result.output)
            assert result.exit_code == 2, f"{command} {kind}: {result.output}"
            assert f"{path} is not a valid workflow" in said
            assert culprits in said, f"{command} {kind}: {said}"
            if kind == "cycle":
                cycle = said.split("the tasks form a cycle: ")[1].split(" [")[0].split(" → ")
                assert cycle[0] == cycle[-1] and set(cycle) == {"x", "y", "z"}, said
    # Nothing reached the scheduler: a good workflow submitted after them is its only one.
    good = {"tasks": [{"name": "ok", "params": {"shell": "true"}}]}
    status = run_and_wait(flotta, good)
    assert status.state is ArtifactState.COMPLETED
    assert flotta.artifacts() == [status.artifact_id]
    assert not list(flotta.folder.rglob("RAN"))


def test_every_cli_submission_reaches_the_scheduler(flotta: Flotta) -> None:
    """`submit` without --wait closes its connection at once; it used to lose the submission
    about half the time here (paho drops what is still queued when its loop stops)."""
    shell_cluster(flotta)
    path = write_workflow(flotta.folder, {"tasks": [{"name": "t", "params": {"shell": "true"}}]})
    sent = [submitted_id(flotta.cli("submit", str(path))) for _ in range(8)]
    wait_for(
        lambda: set(sent) <= set(flotta.artifacts()),
        timeout=TIMEOUT,
        message="submissions lost",
    )


def test_validate_accepts_the_example_and_names_an_unreadable_file(tmp_path: Path) -> None:
    result = invoke("validate", str(REPO / "examples" / "diamond.yaml"))
    assert result.exit_code == 0 and "valid" in result.output and "4 tasks" in result.output
    missing = invoke("validate", str(tmp_path / "absent.yaml"))
    assert missing.exit_code == 2
    assert "config file not found" in flat(missing.output)
    (tmp_path / "broken.yaml").write_text("tasks: [\n")
    broken = invoke("validate", str(tmp_path / "broken.yaml"))
    assert broken.exit_code == 2 and "not valid YAML" in flat(broken.output)


# --- acceptance: retries, then failure that stops only descendants ---------------------------


def test_a_failing_task_is_retried_then_fails_the_workflow_but_not_its_sibling(
    flotta: Flotta,
) -> None:
    shell_cluster(flotta)
    counter, side = flotta.folder / "counter", flotta.folder / "side-effects"
    side.mkdir()
    env = {"COUNTER": str(counter), "SIDE": str(side)}
    workflow = {
        "tasks": [
            {
                "name": "flaky",
                "params": {"shell": 'echo attempt >> "$COUNTER"; echo "failing" >&2; exit 3'},
                "env": env,
                "retries": 2,
            },
            {
                "name": "after",
                "depends": ["flaky"],
                "params": {"shell": 'touch "$SIDE/after"'},
                "env": env,
            },
            {
                "name": "last",
                "depends": ["after"],
                "params": {"shell": 'touch "$SIDE/last"'},
                "env": env,
            },
            {
                "name": "sibling",
                "params": {"shell": "sleep 1.5; echo sibling > s.txt"},
                "outputs": ["s.txt"],
            },
            {
                "name": "nephew",
                "depends": ["sibling"],
                "inputs": ["s.txt"],
                "params": {"shell": "cat s.txt"},
            },
        ]
    }
    status = run_and_wait(flotta, workflow)
    jobs = by_name(status)
    assert status.state is ArtifactState.FAILED
    assert status.error is not None and "task flaky exited with status 3" in status.error.message
    assert status.failed_job == jobs["flaky"].id
    flaky = jobs["flaky"]
    assert (flaky.state, flaky.attempt, flaky.exit_code) == (JobState.FAILED, 3, 3)
    assert counter.read_text().splitlines() == ["attempt"] * 3, "ran exactly three times"
    # Its descendants never started.
    for name in ("after", "last"):
        job = jobs[name]
        assert job.state is JobState.CANCELLED, name
        assert (job.started_at, job.finished_at, job.exit_code) == (None, None, None), name
    assert list(side.iterdir()) == [], "a descendant ran"
    # The independent branch, still running when flaky gave up, finished.
    sibling, nephew = jobs["sibling"], jobs["nephew"]
    assert (sibling.state, nephew.state) == (JobState.COMPLETED, JobState.COMPLETED)
    assert flaky.finished_at and sibling.finished_at and nephew.started_at
    assert sibling.finished_at > flaky.finished_at, "the sibling was still running"
    store = ResourceStore(flotta.storage.url)
    assert store.get_bytes(store.log_url(status.artifact_id, "nephew", 1, "stdout")) == b"sibling\n"
    for attempt in (1, 2, 3):  # each attempt's logs are kept
        log = store.log_url(status.artifact_id, "flaky", attempt, "stderr")
        assert store.get_bytes(log) == b"failing\n"
    result = flotta.cli("logs", status.artifact_id, "flaky")
    assert "failing" in result.output and "attempt 3" in result.output


# --- acceptance: a timeout kills the task and its children ------------------------------------


def test_a_task_over_its_timeout_is_killed_with_its_children(flotta: Flotta) -> None:
    shell_cluster(flotta)
    pids = flotta.folder / "pids"
    workflow = {
        "tasks": [
            {
                "name": "slow",
                "params": {"shell": SPAWNS_A_CHILD},
                "env": {"PIDS": str(pids)},
                "timeout": 1,
            },
            {"name": "never", "depends": ["slow"], "params": {"shell": "true"}},
        ]
    }
    began = time.monotonic()
    status = run_and_wait(flotta, workflow)
    assert time.monotonic() - began < 10, "the task was not stopped near its timeout"
    assert status.state is ArtifactState.FAILED
    slow = by_name(status)["slow"]
    assert slow.state is JobState.FAILED and slow.error is not None
    # The worker's executor kills it at its timeout; the scheduler, which also watches the
    # clock (every 0.25 s), may get there first and have the worker kill it. Either says so.
    assert (
        "task slow timed out after 1.0 s and was killed" in slow.error
        or "ran over its timeout of 1.0 s" in slow.error
    ), slow.error
    assert status.error is not None and "time" in status.error.message
    assert by_name(status)["never"].state is JobState.CANCELLED
    child_pid, shell_pid = (int(p) for p in pids.read_text().split())
    wait_for(lambda: not alive(shell_pid), timeout=5, message="the task's shell outlived it")
    wait_for(lambda: not alive(child_pid), timeout=5, message="the task's child outlived it")


# --- acceptance: job files round-trip through an S3 API server -------------------------------


@pytest.fixture
def s3_storage() -> Iterator[StorageSettings]:
    """A bucket on moto's S3 server on loopback; settings every node uses to reach it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        deadline = time.monotonic() + TIMEOUT
        while True:  # bounded: the server thread listens once it answers any request
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1.0):
                    break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        credentials = {"key": "k", "secret": "s"}
        bucket = f"flotta-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(
            **credentials, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True
        ).mkdir(bucket)
        yield StorageSettings(
            url=f"s3://{bucket}/wf", options={"endpoint_url": endpoint, **credentials}
        )
    finally:
        server.stop()


def test_the_diamond_passes_its_job_files_through_s3(
    broker: LocalBroker, tmp_path: Path, s3_storage: StorageSettings
) -> None:
    flotta = Flotta(broker.url, tmp_path, s3_storage)
    try:
        client = shell_cluster(flotta)
        # The README's example file, then the timed diamond, both on S3.
        example = submitted_id(
            invoke("submit", str(REPO / "examples" / "diamond.yaml"), "--broker", broker.url)
        )
        status = client.handle(example).wait(timeout=TIMEOUT)
        assert status.state is ArtifactState.COMPLETED, status.error
        store = ResourceStore(s3_storage.url, s3_storage.options)
        assert store.get_bytes(store.log_url(example, "d", 1, "stdout")) == b"mean: 5\n"
        status = run_and_wait(flotta, DIAMOND)
        check_diamond(status)
    finally:
        flotta.close()
    artifact_id = status.artifact_id
    raw = s3fs.S3FileSystem(
        key="k",
        secret="s",
        client_kwargs={"endpoint_url": s3_storage.options["endpoint_url"]},
        skip_instance_cache=True,
    )
    root = s3_storage.url.removeprefix("s3://")
    files = sorted(
        p.removeprefix(f"{root}/artifacts/{artifact_id}/files/")
        for p in raw.find(f"{root}/artifacts/{artifact_id}/files")
    )
    jobs = by_name(status)  # each attempt's outputs in a folder of its own
    outputs = (("a", "numbers.txt"), ("b", "sum"), ("c", "n/count"))
    assert files == sorted(f"{jobs[task].id}~1/{path}" for task, path in outputs)
    assert raw.cat_file(f"{root}/artifacts/{artifact_id}/files/{jobs['b'].id}~1/sum") == b"55\n"
    logs = raw.cat_file(f"{root}/artifacts/{artifact_id}/logs/d/attempt-1.stdout")
    assert logs == f"{D_SAYS}\n".encode()
    assert not (tmp_path / "store").exists(), "nothing went to local storage"


# --- a worker without the shell executor never gets a shell task --------------------------------


def test_without_a_shell_worker_a_shell_task_is_refused_by_name(flotta: Flotta) -> None:
    flotta.start({"plain": [], "api-only": ["api"]})
    workflow = {
        "tasks": [
            {"name": "call", "executor": "api", "params": {"url": "http://127.0.0.1:9/x"}},
            {"name": "needs-shell", "depends": ["call"], "params": {"shell": "touch RAN"}},
        ]
    }
    status = run_and_wait(flotta, workflow)
    assert status.state is ArtifactState.FAILED
    assert status.error is not None and status.error.type == "BindingError"
    assert "task needs-shell (step 0): no worker runs tasks (shell, docker or kube)" in (
        status.error.message
    )
    assert status.jobs is None or all(j.started_at is None for j in status.jobs)
    assert not list(flotta.folder.rglob("RAN"))


def test_shell_tasks_go_only_to_workers_offering_shell(flotta: Flotta) -> None:
    shell_cluster(flotta)
    tasks = [{"name": f"t{i}", "params": {"shell": "echo $PWD"}} for i in range(6)]
    status = run_and_wait(flotta, {"tasks": tasks})
    assert status.state is ArtifactState.COMPLETED
    placed = [job.worker for job in by_name(status).values()]
    assert sorted(placed) == ["w0"] * 3 + ["w1"] * 3, "spread evenly, never on plain"


# --- replicas: one task run N times, each told its index ----------------------------------------


def test_replicas_run_with_their_index_and_a_dependent_waits_for_all(flotta: Flotta) -> None:
    shell_cluster(flotta)
    seen = flotta.folder / "seen"
    workflow = {
        "tasks": [
            {
                "name": "t",
                "replicas": 3,
                "params": {
                    "shell": 'sleep 0.3; echo "replica $FLOTTA_REPLICA of $FLOTTA_REPLICAS"; '
                    'echo "$FLOTTA_REPLICA" >> "$SEEN"'
                },
                "env": {"SEEN": str(seen)},
            },
            {
                "name": "after",
                "depends": ["t"],
                "params": {"shell": 'sort "$SEEN"'},
                "env": {"SEEN": str(seen)},
            },
        ]
    }
    status = run_and_wait(flotta, workflow)
    assert status.state is ArtifactState.COMPLETED, status.error
    jobs = by_name(status)
    assert sorted(jobs) == ["after", "t[0]", "t[1]", "t[2]"]
    replicas = [jobs[f"t[{i}]"] for i in range(3)]
    assert {job.worker for job in replicas} == set(SHELL_WORKERS), "spread, never on plain"
    after = jobs["after"]
    assert after.started_at is not None
    assert all(job.finished_at and job.finished_at <= after.started_at for job in replicas)
    # Each replica got its own index; the dependent saw all three, so it ran after them.
    store = ResourceStore(flotta.storage.url)
    for i in range(3):
        log = store.get_bytes(store.log_url(status.artifact_id, f"_t.{i}", 1, "stdout"))
        assert log == f"replica {i} of 3\n".encode()
    assert store.get_bytes(store.log_url(status.artifact_id, "after", 1, "stdout")) == b"0\n1\n2\n"
    # `logs ID t` prints every replica's output, `logs ID t[1]` only that replica's.
    every = flotta.cli("logs", status.artifact_id, "t")
    assert every.exit_code == 0, every.output
    assert all(f"replica {i} of 3" in every.output for i in range(3))
    one = flotta.cli("logs", status.artifact_id, "t[1]")
    assert "replica 1 of 3" in one.output and "replica 0" not in one.output


def test_more_results_than_a_status_can_carry_come_as_a_manifest(flotta: Flotta) -> None:
    shell_cluster(flotta)
    width = LISTED_JOBS + 1  # one more final job than a status lists
    workflow = {"tasks": [{"name": "t", "replicas": width, "params": {"command": ["true"]}}]}
    status = run_and_wait(flotta, workflow)
    assert status.state is ArtifactState.COMPLETED, status.error
    assert status.jobs is None  # too many to list
    [manifest] = status.results
    assert manifest.media_type == RESULTS_MANIFEST
    store = ResourceStore(flotta.storage.url)
    assert len(store.results(status.results, status.artifact_id)) == width
    assert flotta.client is not None
    products = flotta.client.handle(status.artifact_id).result(timeout=TIMEOUT)
    assert len(products) == width
    assert all(product["exit_code"] == 0 for product in products)


def test_results_that_cannot_be_stored_still_end_the_artifact(
    flotta: Flotta, monkeypatch: pytest.MonkeyPatch
) -> None:
    shell_cluster(flotta)
    blocker = flotta.folder / "not-a-folder"
    blocker.write_text("")  # where the manifest would go is a file: writing it fails
    monkeypatch.setattr(
        ResourceStore, "results_url", lambda self, artifact_id: f"{blocker.as_uri()}/results.json"
    )
    workflow = {
        "tasks": [{"name": "t", "replicas": LISTED_JOBS + 1, "params": {"command": ["true"]}}]
    }
    status = run_and_wait(flotta, workflow)
    assert status.state is ArtifactState.COMPLETED, status.error
    assert status.results == []
    assert flotta.client is not None
    with pytest.raises(PermissionError, match="could not store"):
        flotta.client.handle(status.artifact_id).result(timeout=TIMEOUT)
