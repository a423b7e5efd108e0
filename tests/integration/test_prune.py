"""Pruning as users run it: a scheduler and a worker as CLI processes on a real mosquitto,
workflow files submitted (in-process, as `flotta-mqtt submit` does: a process each cost a
second, and submission is not what is tested here), their files and logs in a local store
or on a real S3 API, and `flotta-mqtt prune`. What is left is counted afterwards: database
rows per table, store objects, retained statuses on the broker, rows of the worker's
journal.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import s3fs
import yaml
from helpers import wait_for
from moto.server import ThreadedMotoServer
from test_cli_processes import cli, online, run, stopped

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.identities import IdentitySpec, generate_identities
from flotta_mqtt.cli.errors import INVALID
from flotta_mqtt.cli.files import load_artifact
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import Artifact, ArtifactState, Operation, Parallel
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import PruneRequest, topics
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

pytestmark = pytest.mark.integration

TIMEOUT = 30.0
ADMIN = "ops"
WORKER = "w-prune"
# `schedules` holds no artifact's rows: a schedule's runs are artifacts like any other.
TABLES = {"artifacts", "jobs", "locks", "nodes", "schedules"}

DONE = {
    "tasks": [
        {"name": "make", "params": {"shell": "seq 1 50 > numbers.txt"}, "outputs": ["numbers.txt"]},
        {
            "name": "count",
            "depends": ["make"],
            "inputs": ["numbers.txt"],
            "params": {"shell": "wc -l < numbers.txt"},
        },
    ]
}
FAILS = {"tasks": [{"name": "fail", "params": {"shell": "echo going down; exit 3"}}]}


def waits_for(flag: Path) -> dict[str, Any]:
    """A workflow whose one task runs until `flag` exists (the wait is its workload)."""
    shell = f"echo waiting; while [ ! -e {flag} ]; do sleep 0.05; done"
    return {"tasks": [{"name": "wait", "params": {"shell": shell}}]}


# --- the store, local or S3 ----------------------------------------------------------------


@dataclass
class Store:
    settings: StorageSettings
    folder: Path | None = None  # a local store's folder
    s3: Any = None  # an s3fs client of the test's own, for an S3 store

    def objects(self) -> Counter[str]:
        """Objects under the store's artifacts/ folder, counted by artifact id."""
        if self.folder is not None:
            base = self.folder / "artifacts"
            found = [p.relative_to(base).parts[0] for p in base.rglob("*") if p.is_file()]
            return Counter(found)
        root = self.settings.url.removeprefix("s3://") + "/artifacts/"
        self.s3.invalidate_cache()
        return Counter(p.removeprefix(root).split("/")[0] for p in self.s3.find(root))


def s3_store() -> Iterator[Store]:
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
        raw = s3fs.S3FileSystem(
            **credentials, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True
        )
        bucket = f"flotta-{uuid.uuid4().hex[:12]}"
        raw.mkdir(bucket)
        options = {"endpoint_url": endpoint, **credentials}
        yield Store(StorageSettings(url=f"s3://{bucket}/root", options=options), s3=raw)
    finally:
        server.stop()


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A local store, or with `indirect` parametrisation "s3" a bucket on moto's server."""
    if getattr(request, "param", "file") == "file":
        folder = tmp_path / "store"
        yield Store(StorageSettings(url=folder.as_uri()), folder=folder)
    else:
        yield from s3_store()


# --- the nodes, as CLI processes -----------------------------------------------------------


@dataclass
class Site:
    """A scheduler and a shell worker run by the CLI; what a test counts of them."""

    broker: str
    folder: Path
    store: Store
    processes: list[Any] = field(default_factory=list)

    @property
    def database(self) -> Path:
        return self.folder / "scheduler.db"

    @property
    def journal(self) -> Path:
        return self.folder / "worker-state" / "journal.db"

    def start(self, *scheduler_args: str, **env: str) -> None:
        config = self.folder / "node.yaml"
        config.write_text(yaml.safe_dump({"storage": self.store.settings.model_dump()}))
        common = ["--config", str(config), "--broker", self.broker, "--log-level", "WARNING"]
        self.processes.append(
            cli("scheduler", *common, "--database", str(self.database), *scheduler_args, **env)
        )
        state = str(self.folder / "worker-state")
        worker = cli(
            "worker", *common, "--name", WORKER, "--executor", "shell", "--state-dir", state
        )
        self.processes.append(worker)
        online(self.broker, "scheduler.initiator", WORKER)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            stopped(process)

    def submit(self, client: Client, workflow: dict[str, Any]) -> str:
        """Submit a workflow file with `client` as `flotta-mqtt submit` does; its id."""
        path = self.folder / f"{uuid.uuid4().hex}.yaml"
        path.write_text(yaml.safe_dump(workflow))
        return client.submit(load_artifact(path)).artifact_id

    def rows(self) -> dict[str, Counter[str]]:
        """Rows of every table of the scheduler's database, by artifact (nodes by name)."""
        with closing(sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)) as db:
            tables = {
                name
                for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            assert tables == TABLES, "a table pruning does not know of"
            return {
                "artifacts": Counter(i for (i,) in db.execute("SELECT id FROM artifacts")),
                "jobs": Counter(i for (i,) in db.execute("SELECT artifact_id FROM jobs")),
                "locks": Counter(i for (i,) in db.execute("SELECT artifact_id FROM locks")),
                "nodes": Counter(n for (n,) in db.execute("SELECT name FROM nodes")),
            }

    def journaled(self) -> Counter[str]:
        """Rows of the worker's journal, by artifact."""
        with closing(sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True)) as db:
            return Counter(i for (i,) in db.execute("SELECT artifact_id FROM jobs"))

    def retained(self) -> set[str]:
        """The artifacts whose status the broker retains (a fresh subscriber's deliveries)."""
        with Client(BrokerSettings(url=self.broker)) as client:
            return set(client.statuses(TIMEOUT))

    def prune(self, older_than: str, *args: str) -> tuple[int, str, str]:
        return run("prune", "--older-than", older_than, "--broker", self.broker, *args)


@pytest.fixture
def site(broker: LocalBroker, tmp_path: Path, store: Store) -> Iterator[Site]:
    nodes = Site(broker.url, tmp_path, store)
    try:
        yield nodes
    finally:
        nodes.stop()


def running(client: Client, artifact_id: str) -> None:
    handle = client.handle(artifact_id)
    wait_for(
        lambda: (s := handle.status()) is not None and s.counts.get("running", 0) == 1,
        timeout=TIMEOUT,
        message=f"{artifact_id} never ran",
    )


# --- prune on request ---------------------------------------------------------------------


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
def test_prune_removes_finished_artifacts_whole_and_leaves_the_running_one(site: Site) -> None:
    site.start("--admin", ADMIN)
    flag = site.folder / "go"
    with Client(BrokerSettings(url=site.broker)) as client:
        still = site.submit(client, waits_for(flag))
        running(client, still)
        done = [site.submit(client, DONE) for _ in range(2)]
        failed = site.submit(client, FAILS)
        for artifact_id in [*done, failed]:
            client.handle(artifact_id).wait(timeout=TIMEOUT)
        # Submitted once they are done: with `still`, it fills the worker's two job slots.
        cancelled = site.submit(client, waits_for(site.folder / "never"))
        running(client, cancelled)
        client.handle(cancelled).cancel()  # by its owner, this client
        finished = sorted([*done, failed, cancelled])
        states = {i: client.handle(i).wait(timeout=TIMEOUT).state for i in finished}
    assert sorted(states.values()) == sorted(
        [ArtifactState.COMPLETED] * 2 + [ArtifactState.FAILED, ArtifactState.CANCELLED]
    )
    everything = {still, *finished}
    rows = site.rows()
    assert set(rows["artifacts"]) == set(rows["jobs"]) == everything
    assert rows["locks"][done[0]] == 1 and rows["nodes"][WORKER] == 1
    assert {*done, failed} <= set(site.store.objects())  # their logs, job files
    assert site.retained() == everything
    wait_for(lambda: set(site.journaled()) == {still}, TIMEOUT, "the worker's journal kept more")

    # Nothing finished an hour ago: nothing goes.
    code, out, err = site.prune("1h", "--username", ADMIN)
    assert (code, out.split("\n")[0]) == (0, "pruned 0 artifacts finished over 1h ago"), err
    assert site.rows() == rows

    code, out, err = site.prune("0s", "--username", ADMIN, "--output", "json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["pruned"], sorted(report["artifact_ids"])) == (4, finished)

    # What is left: the running artifact's, whole; of the others, nothing anywhere.
    left = site.rows()
    assert left == {
        "artifacts": Counter({still: 1}),
        "jobs": Counter({still: rows["jobs"][still]}),
        "locks": +Counter({still: rows["locks"][still]}),
        "nodes": rows["nodes"],
    }
    assert set(site.store.objects()) <= {still}
    assert site.retained() == {still}
    assert site.journaled() == Counter({still: 1})
    for command in (["status"], ["download", str(site.folder / "out.json")], ["cancel"]):
        code, out, err = run(command[0], finished[0], *command[1:], "--broker", site.broker)
        assert code == INVALID and f"no such artifact ID {finished[0]}" in err, (command, err)

    # The running artifact goes on untouched, to its end.
    flag.touch()
    with Client(BrokerSettings(url=site.broker)) as client:
        assert client.handle(still).wait(timeout=TIMEOUT).state is ArtifactState.COMPLETED
    code, out, err = site.prune("0s", "--username", ADMIN)
    assert code == 0 and out.split("\n")[:2] == [
        "pruned 1 artifact finished over 0s ago",
        f"  {still}",
    ], err
    left = site.rows()
    assert not (left["artifacts"] or left["jobs"] or left["locks"])
    assert site.retained() == set() and not site.store.objects()


def test_only_an_admin_may_prune(site: Site) -> None:
    site.start("--admin", ADMIN)
    with Client(BrokerSettings(url=site.broker)) as client:
        done = site.submit(client, DONE)
        client.handle(done).wait(timeout=TIMEOUT)
    for who in ([], ["--username", "alice"]):
        code, out, err = site.prune("0s", *who)
        assert (code, out) == (INVALID, ""), err
        assert err.count("\n") == 1 and "may not prune: only the scheduler's admins may" in err
    assert set(site.rows()["artifacts"]) == {done}
    assert site.retained() == {done}


def test_a_bad_duration_is_one_line_and_exit_code_2(broker: LocalBroker) -> None:
    for bad in ("7x", "-1d", "1e3", "99999999d"):
        code, out, err = run("prune", "--older-than", bad, "--broker", broker.url)
        assert (code, out) == (INVALID, ""), (bad, err)
        assert err.count("\n") == 1 and err.startswith("error: --older-than: ") and repr(bad) in err
    code, _, err = run("scheduler", "--prune-older-than", "soon", "--broker", broker.url)
    assert code == INVALID and err.count("\n") == 1 and "invalid duration 'soon'" in err


def test_no_scheduler_is_a_timeout_with_exit_code_3(broker: LocalBroker) -> None:
    code, _, err = run("prune", "--older-than", "1d", "--broker", broker.url, "--timeout", "1")
    assert code == 3 and "no answer to the prune request in 1.0 s" in err, err


# --- the periodic prune --------------------------------------------------------------------


def test_the_scheduler_prunes_periodically_and_never_a_running_artifact(site: Site) -> None:
    """With --prune-older-than 2s (here its variable), an artifact finished for 2 s goes;
    one running for longer stays until it has finished for 2 s too."""
    site.start(FLOTTA_PRUNE_OLDER_THAN="2s")
    flag = site.folder / "go"
    with Client(BrokerSettings(url=site.broker)) as client:
        still = site.submit(client, waits_for(flag))
        running(client, still)
        done = site.submit(client, DONE)
        client.handle(done).wait(timeout=TIMEOUT)
        wait_for(lambda: done not in site.retained(), TIMEOUT, f"{done} was never pruned")
        assert set(site.rows()["artifacts"]) == {still}
        assert set(site.store.objects()) <= {still}
        assert client.handle(still).status().state is ArtifactState.RUNNING  # type: ignore[union-attr]
        flag.touch()
        client.handle(still).wait(timeout=TIMEOUT)
        wait_for(lambda: not site.retained(), TIMEOUT, f"{still} was never pruned")
    assert not site.rows()["artifacts"] and not site.store.objects()


# --- who may prune, with broker identities -------------------------------------------------


def test_with_identities_nobody_prunes_in_an_admins_name(tmp_path: Path) -> None:
    """The admin check trusts the client the topic names; the broker's ACL makes that the
    sender: alice's prune request written under the admin's name never arrives."""
    # Not under tmp_path: mosquitto runs as its own user, who cannot enter pytest's folders.
    data_dir = Path(tempfile.mkdtemp(prefix="flotta-prune-broker-"))
    try:
        spec = IdentitySpec(scheduler="scheduler", workbenches=[ADMIN, "alice"])
        identities = generate_identities(spec, data_dir / "identities")
        with LocalBroker(
            data_dir=data_dir,
            password_file=identities.password_file,
            acl_file=identities.acl_file,
        ) as secured:
            config = SchedulerConfig(
                broker=identities.broker_settings("scheduler", secured.url),
                initiator_broker=identities.broker_settings("scheduler.initiator", secured.url),
                storage=StorageSettings(url=(tmp_path / "store").as_uri()),
                database=tmp_path / "scheduler.db",
                worker_grace=0.1,
                admins=[ADMIN],
            )
            node = SchedulerNode(config).start(wait=TIMEOUT)
            try:
                alice = Client(identities.broker_settings("alice", secured.url))
                ops = Client(identities.broker_settings(ADMIN, secured.url))
                with alice, ops:
                    # No worker holds its project: it fails at once, and is final.
                    artifact = Artifact(project="nobody", steps=[Parallel(Operation(name="count"))])
                    assert (
                        alice.submit(artifact).wait(timeout=TIMEOUT).state is ArtifactState.FAILED
                    )
                    alice.bus.publish(topics.prune(ADMIN), PruneRequest(older_than=0))
                    with pytest.raises(PermissionError, match="alice may not prune"):
                        alice.prune(0, timeout=TIMEOUT)
                    # The scheduler reads alice's requests in order: had the forged one
                    # arrived, it would have pruned the artifact before refusing her own.
                    assert alice.lookup(artifact.id, timeout=TIMEOUT).status() is not None
                    # (Only alice reads her artifacts' topics: the ACL follows owners.)
                    assert artifact.id in alice.statuses(TIMEOUT)
                    report = ops.prune(0, timeout=TIMEOUT)
                    assert (report.pruned, report.artifact_ids) == (1, [artifact.id])
                    alice.forget(artifact.id)
                    assert artifact.id not in alice.statuses(TIMEOUT)
            finally:
                node.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
