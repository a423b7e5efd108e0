"""Owners and tenants, attacked on a real mosquitto with the ACL generated from a registry.

Each artifact belongs to the workbench that submitted it: its status and lock topics name
that owner, the broker delivers them only to the owner, an admin and the dashboards of
the owner's tenant, and the scheduler answers another workbench's cancel or status request
about it as about an unknown id. Quotas cap what one identity may have in flight; a
flood of refused submissions does not slow anyone else down.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import MessageRecorder, wait_for

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.identities import Identities, IdentitySpec, generate_identities
from flotta_mqtt.client.client import Client, NoSuchArtifact
from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    Collect,
    Finalize,
    Iterate,
    Operation,
    Parallel,
    Registry,
    Task,
    Tasks,
)
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import (
    ArtifactStatus,
    JobBatch,
    JobFinished,
    JobReady,
    NodePresence,
    Resource,
    decode,
    topics,
)
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import StorageSettings
from flotta_mqtt.transport.store import sha256_hex
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

TIMEOUT = 20.0
REGISTRY = Registry.model_validate(
    {
        "scheduler": "scheduler",
        # node-2 never comes online: artifacts of `idle` wait for it, in flight.
        # node-3 holds nothing and may run nothing but analytics of no project.
        "workers": {
            "node-1": {"projects": ["demo"]},
            "node-2": {"projects": ["idle"]},
            "node-3": {},
        },
        "workbenches": {
            "alice": {"tenant": "oncology"},
            "carol": {"tenant": "oncology"},
            "bob": {"tenant": "cardiology"},
            "ops": {"admin": True},
        },
        "dashboards": {"board": {"tenants": ["oncology"]}},
    }
)
COUNT = Operation(name="count")


def count(**fields: object) -> Artifact:
    return Artifact(project="demo", steps=[Parallel(COUNT, Collect()), Finalize(COUNT)], **fields)  # type: ignore[arg-type]


@dataclass
class Site:
    broker: LocalBroker
    identities: Identities
    storage: StorageSettings
    scheduler: SchedulerNode

    def client(self, name: str) -> Client:
        settings = self.identities.broker_settings(name, self.broker.url)
        return Client(settings, storage=self.storage, resend_interval=1.0)

    def watcher(self, name: str, recorder: MessageRecorder) -> Bus:
        """A raw connection as `name`, subscribed to every artifact's topics."""
        settings = self.identities.broker_settings(name, self.broker.url)
        bus = Bus(f"{name}-{uuid.uuid4().hex[:6]}", settings, recorder, ["flotta/#"], clean=True)
        return bus.start(wait=TIMEOUT)


@contextmanager
def start_site(folder: Path, **scheduler: object) -> Iterator[Site]:
    registry_file = folder / "registry.yaml"
    registry_file.write_text(REGISTRY.model_dump_json())  # JSON is YAML
    identities = generate_identities(IdentitySpec.of(REGISTRY), folder / "identities")
    data = folder / "node-1.csv"
    data.write_text("x\n" + "".join(f"{i}\n" for i in range(12)))
    storage = StorageSettings(url=(folder / "store").as_uri())
    with LocalBroker(
        data_dir=folder,  # opened to the broker's user, as the identities in it must be
        password_file=identities.password_file,
        acl_file=identities.acl_file,
    ) as broker:
        config = SchedulerConfig(
            broker=identities.broker_settings("scheduler", broker.url),
            initiator_broker=identities.broker_settings("scheduler.initiator", broker.url),
            storage=storage,
            database=folder / "scheduler.db",
            registry=registry_file,
            **scheduler,  # type: ignore[arg-type]
        )
        node = SchedulerNode(config).start(wait=TIMEOUT)
        worker = WorkerAgent(
            WorkerConfig(
                name="node-1",
                broker=identities.broker_settings("node-1", broker.url),
                storage=storage,
                datasets={"demo": {"paths": [data], "privacy": {"exact": True}}},
                state_dir=folder / "node-1",
            )
        ).start(wait=TIMEOUT)
        try:
            yield Site(broker, identities, storage, node)
        finally:
            worker.stop()
            node.stop()


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="flotta-tenants-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def site(folder: Path) -> Iterator[Site]:
    with start_site(folder) as site:
        yield site


def statuses_seen(recorder: MessageRecorder) -> set[str]:
    seen = set()
    for topic, payload in recorder.messages:
        if topic.endswith("/status") and "/marker/" not in topic:
            _, status = decode(topic, payload)
            assert isinstance(status, ArtifactStatus)
            seen.add(status.artifact_id)
    return seen


def test_only_the_owner_an_admin_and_its_tenants_dashboard_see_an_artifact(site: Site) -> None:
    # (One connection per identity: the broker names sessions by username.)
    watchers = {name: MessageRecorder() for name in ("carol", "board", "ops")}
    buses = [site.watcher(name, recorder) for name, recorder in watchers.items()]
    try:
        with site.client("alice") as alice, site.client("bob") as bob:
            mine = alice.submit(count())
            assert mine.result(timeout=TIMEOUT) == 12
            theirs = bob.submit(count())
            assert theirs.result(timeout=TIMEOUT) == 12
            # Each workbench's view of every status the broker retains: its own only.
            assert set(alice.statuses()) == {mine.artifact_id}
            assert set(bob.statuses()) == {theirs.artifact_id}
        # A marker on each watcher's own readable topic, sent after every status: once it
        # is in, every status that watcher was going to get is in too.
        scheduler = site.scheduler.scheduler.bus
        for name, owner in (("ops", "alice"), ("board", "alice"), ("carol", "carol")):
            scheduler.publish_raw(topics.status(owner, "marker"), b"{}")
            watchers[name].wait_for(lambda msgs: any("/marker/" in t for t, _ in msgs))
    finally:
        for bus in buses:
            bus.stop()
    assert statuses_seen(watchers["ops"]) >= {mine.artifact_id, theirs.artifact_id}
    assert mine.artifact_id in statuses_seen(watchers["board"])
    assert theirs.artifact_id not in statuses_seen(watchers["board"])
    assert statuses_seen(watchers["carol"]) == set()  # same tenant, not the owner


def test_another_workbench_cannot_cancel_ask_about_or_take_over_an_artifact(site: Site) -> None:
    with site.client("alice") as alice, site.client("bob") as bob, site.client("ops") as ops:
        slow = Artifact(project="idle", steps=[Parallel(COUNT)], deadline=600)  # waits for node-2
        handle = alice.submit(slow)
        alice.wait_for(lambda: handle.status() is not None, TIMEOUT)
        # The same id submitted by another is refused, and changes nothing of alice's.
        hijack = bob.submit(slow.model_copy(update={"steps": [Parallel(COUNT)]}))
        bob.wait_for(lambda: hijack.refused() is not None, TIMEOUT)
        refused = hijack.refused()
        assert refused is not None and "is taken" in refused.error
        bob.forget(handle.artifact_id)
        with pytest.raises(NoSuchArtifact):
            bob.lookup(handle.artifact_id, timeout=TIMEOUT)
        bob.forget(handle.artifact_id)
        bob.cancel(handle.artifact_id)
        bob.wait_for(lambda: bob.rejection_of(handle.artifact_id) is not None, TIMEOUT)
        rejection = bob.rejection_of(handle.artifact_id)
        assert rejection is not None and rejection.reason == "unknown_artifact"
        assert rejection.topic == topics.cancel("bob")
        status = alice.lookup(handle.artifact_id, timeout=TIMEOUT).status()
        assert status is not None and status.state is ArtifactState.RUNNING  # untouched
        # An admin may look at and cancel anyone's.
        assert ops.lookup(handle.artifact_id, timeout=TIMEOUT).status() is not None
        ops.cancel(handle.artifact_id)
        assert handle.wait(timeout=TIMEOUT).state is ArtifactState.CANCELLED


def test_allow_download_off_leaves_no_product_in_any_status(folder: Path) -> None:
    with start_site(folder, allow_download=False) as site, site.client("alice") as alice:
        handle = alice.submit(count())
        status = handle.wait(timeout=TIMEOUT)
        assert status.state is ArtifactState.COMPLETED
        assert status.results == []
        assert status.jobs and all(job.product is None for job in status.jobs)


def test_a_nested_iterate_of_billions_of_jobs_is_refused_at_once(site: Site) -> None:
    nested: Parallel | Iterate = Parallel(COUNT)
    for _ in range(5):
        nested = Iterate(rounds=100, steps=[nested])
    bomb = Artifact(project="demo", steps=[nested])
    assert len(bomb.model_dump_json()) < 1000
    with site.client("alice") as alice:
        started = time.monotonic()
        handle = alice.submit(bomb)
        alice.wait_for(lambda: handle.refused() is not None, TIMEOUT)
        refused = handle.refused()
        assert refused is not None and refused.reason == "quota"
        assert "10000000000 jobs" in refused.error and "at most 1000000" in refused.error
        assert time.monotonic() - started < 5
        assert alice.submit(count()).result(timeout=TIMEOUT) == 12  # still answering


def test_a_flood_past_its_quota_is_refused_and_others_go_on(folder: Path) -> None:
    idle = Artifact(project="idle", steps=[Parallel(COUNT)], deadline=600)
    with (
        start_site(folder, max_artifacts_in_flight=3) as site,
        site.client("alice") as alice,
        site.client("bob") as bob,
    ):
        held = [alice.submit(idle.model_copy(update={"id": f"idle-{i}"})) for i in range(3)]
        alice.wait_for(lambda: all(h.status() is not None for h in held), TIMEOUT)
        flood = [alice.submit(count()) for _ in range(200)]
        alice.wait_for(lambda: all(h.refused() is not None for h in flood), TIMEOUT)
        refusals = [h.refused() for h in flood]
        assert all(r is not None and r.reason == "quota" for r in refusals)
        assert "alice has 3 artifacts in flight" in str(refusals[0])
        started = time.monotonic()
        assert bob.submit(count()).result(timeout=TIMEOUT) == 12
        assert time.monotonic() - started < 10
        # One of alice's ends: she may submit again.
        held[0].cancel()
        alice.wait_for(
            lambda: (s := held[0].status()) is not None and s.state is ArtifactState.CANCELLED,
            TIMEOUT,
        )
        assert alice.submit(count()).result(timeout=TIMEOUT) == 12


def test_a_forged_presence_gets_a_worker_nothing_the_registry_does_not_grant(
    folder: Path,
) -> None:
    """A registered worker with no data and no code rights claims every project and
    executor: the count covers the real holder alone, and no task (with its secret
    header) nor any code reaches it."""
    intruder = MessageRecorder()
    # The api task fails once the scheduler gives up waiting for a worker able to run it:
    # 1 s after it started, not the default 5 (node-1, which holds demo, is online by then).
    with start_site(folder, worker_grace=1.0) as site:
        settings = site.identities.broker_settings("node-3", site.broker.url)
        bus = Bus("node-3", settings, intruder, [topics.worker_inbox("node-3")])
        bus.start(wait=TIMEOUT)
        try:
            claim = NodePresence(
                node="node-3",
                online=True,
                projects=["demo", "idle"],
                operations=["count"],
                executors=["api", "shell", "python"],
                labels={"allow_code": "yes"},
                since=time.time(),
            )
            bus.publish(topics.presence("node-3"), claim, retain=True)
            with site.client("alice") as alice:
                wait_for(lambda: any(p.node == "node-3" for p in alice.workers()), timeout=TIMEOUT)
                assert alice.submit(count()).result(timeout=TIMEOUT) == 12  # node-1's alone
                secret = {"url": "http://127.0.0.1:9/", "headers": {"Authorization": "s3cr3t"}}
                task = Task(name="call", executor="api", params=secret)
                handle = alice.submit(Artifact(project="demo", steps=[Tasks(tasks=[task])]))
                status = handle.wait(timeout=TIMEOUT)
                assert status.state is ArtifactState.FAILED  # no registered worker runs api
        finally:
            bus.stop()
    assert intruder.messages == []  # never a job, never a header


def test_a_worker_identity_reporting_a_product_outside_the_store_gets_nothing_read(
    folder: Path,
) -> None:
    """node-2, with its own generated identity, answers its job with a product URL on the
    worker host's files (true size and sha256): the broker lets it (its own events topic),
    the initiator consuming the product refuses the URL without opening it."""
    jobs = MessageRecorder()
    with start_site(folder) as site:
        settings = site.identities.broker_settings("node-2", site.broker.url)
        node_2 = Bus("node-2", settings, jobs, [topics.worker_inbox("node-2")])
        node_2.start(wait=TIMEOUT)
        try:
            with site.client("alice") as alice:
                artifact = Artifact(
                    project="idle", steps=[Parallel(COUNT, Collect()), Finalize(COUNT)]
                )
                handle = alice.submit(artifact)
                received = jobs.wait_for(lambda msgs: bool(msgs), timeout=TIMEOUT)
                _, job = decode(*received[0])
                ready = job.jobs[0] if isinstance(job, JobBatch) else job
                assert isinstance(ready, JobReady)
                secret = Path("/etc/passwd").read_bytes()
                forged = Resource(
                    url="file:///etc/passwd", sha256=sha256_hex(secret), size=len(secret)
                )
                now = time.time()
                node_2.publish(
                    topics.events("node-2"),
                    JobFinished(job=ready.ref, product=forged, started_at=now, finished_at=now),
                )
                status = handle.wait(timeout=TIMEOUT)
        finally:
            node_2.stop()
    assert status.state is ArtifactState.FAILED
    assert status.error is not None and status.error.type == "ResourceRefused"
    assert "refused file:///etc/passwd: not a key under" in status.error.message
