"""Scheduler groups on a real mosquitto with the ACL generated from a registry.

Two groups share the broker and the store: each has its scheduler and worker, and a
workbench in no group submits to both by project alone. Attacked: a group's worker
identity subscribing to everything gets nothing of the other group, a group's scheduler
cannot send jobs into the other group, and neither a workbench nor another group's
scheduler can rewrite the directory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import MessageRecorder, job_ready

from flotta_mqtt import Artifact, Client, Collect, Compare, Finalize, Operation, Parallel
from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.identities import Identities, IdentitySpec, generate_identities
from flotta_mqtt.model import Registry
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import DirectoryEntry, encode, topics
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.bus import Bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

TIMEOUT = 20.0
REGISTRY = Registry.model_validate(
    {
        "groups": {
            "a": {"scheduler": "sched-a", "projects": ["pa"]},
            "b": {"scheduler": "sched-b", "projects": ["pb"]},
            "c": {"scheduler": "sched-c"},
        },
        # wa2, wb2 and sched-c never run: theirs are the attackers' and witnesses' identities.
        "workers": {
            "wa": {"projects": ["pa"], "group": "a"},
            "wb": {"projects": ["pb"], "group": "b"},
            "wa2": {"group": "a"},
            "wb2": {"group": "b"},
        },
        "workbenches": {"alice": {}, "carol": {}},
    }
)
ROWS = {"a": 7, "b": 11}
COUNT = Operation(
    name="count", params={"where": Compare(column="x", op=">", value=0.5).model_dump()}
)


def count(project: str) -> Artifact:
    return Artifact(
        project=project, steps=[Parallel(COUNT, Collect()), Finalize(Operation(name="count"))]
    )


@dataclass
class Deployment:
    broker: LocalBroker
    identities: Identities
    storage: StorageSettings
    schedulers: dict[str, SchedulerNode]

    def settings(self, name: str, group: str | None = None) -> BrokerSettings:
        settings = self.identities.broker_settings(name, self.broker.url)
        return settings.model_copy(update={"group": group})

    def client(self, name: str) -> Client:
        return Client(self.settings(name), storage=self.storage, resend_interval=1.0)

    def raw(
        self,
        name: str,
        recorder: MessageRecorder,
        subscriptions: list[str],
        group: str | None = None,
    ) -> Bus:
        """A connection as `name` (in `group`) that records what it receives."""
        bus = Bus(name, self.settings(name, group), recorder, subscriptions, clean=True)
        return bus.start(wait=TIMEOUT)


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    folder = Path(tempfile.mkdtemp(prefix="flotta-groups-"))
    registry = folder / "registry.yaml"
    registry.write_text(REGISTRY.model_dump_json())
    identities = generate_identities(IdentitySpec.of(REGISTRY), folder / "identities")
    storage = StorageSettings(url=(folder / "store").as_uri())
    running: list[SchedulerNode | WorkerAgent] = []
    try:
        with LocalBroker(
            data_dir=folder, password_file=identities.password_file, acl_file=identities.acl_file
        ) as broker:
            site = Deployment(broker, identities, storage, {})
            for group in ("a", "b"):
                node = SchedulerNode(
                    SchedulerConfig(
                        name=f"sched-{group}",
                        broker=site.settings(f"sched-{group}", group),
                        initiator_broker=site.settings(f"sched-{group}.initiator", group),
                        storage=storage,
                        database=folder / f"sched-{group}.db",
                        registry=registry,
                        worker_grace=0.5,
                    )
                ).start(wait=TIMEOUT)
                site.schedulers[group] = node
                running.append(node)
                data = folder / f"w{group}.csv"
                data.write_text("x\n" + "1\n" * ROWS[group] + "0\n" * 5)
                worker = WorkerConfig(
                    name=f"w{group}",
                    broker=site.settings(f"w{group}", group),
                    storage=storage,
                    datasets={f"p{group}": {"paths": [data], "privacy": {"exact": True}}},
                    state_dir=folder / f"w{group}",
                )
                running.append(WorkerAgent(worker).start(wait=TIMEOUT))
            yield site
            for part in reversed(running):
                part.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def directory_of(site: Deployment, project: str) -> DirectoryEntry:
    """The directory entry retained for `project`, once the scheduler has published it."""
    entries = MessageRecorder()
    bus = site.raw("carol", entries, [topics.directory(project)])
    try:
        [(_, payload)] = entries.wait(1, TIMEOUT)
    finally:
        bus.stop()
    return DirectoryEntry.model_validate_json(payload)


def test_a_workbench_submits_to_both_groups_by_project_alone(deployment: Deployment) -> None:
    for group in ("a", "b"):  # retained before the workbench asks
        assert directory_of(deployment, f"p{group}").group == group
    with deployment.client("alice") as alice:
        handles = {group: alice.submit(count(f"p{group}")) for group in ("a", "b")}
        for group, handle in handles.items():
            assert handle.group == group
            assert handle.result(timeout=TIMEOUT) == ROWS[group]
            status = handle.status()
            assert status is not None and status.holders == [f"w{group}"]


@pytest.mark.parametrize(("spy", "group"), [("wa2", "a"), ("sched-c", "c")])
def test_another_groups_identities_receive_nothing_of_a_group(
    deployment: Deployment, spy: str, group: str
) -> None:
    """A worker's and a scheduler's identity of other groups, subscribed to everything
    while an artifact of group b runs, get none of it."""
    seen = MessageRecorder()
    # In its group, its own namespace's topics arrive as the protocol spells them; any
    # other would arrive as it is.
    bus = deployment.raw(spy, seen, ["#", "flotta/#", "flotta/v1-b/#"], group=group)
    try:
        with deployment.client("alice") as alice:
            handle = alice.submit(count("pb"))
            assert handle.result(timeout=TIMEOUT) == ROWS["b"]
        # A marker the spy may read, sent after all of b's work: once it is in, all is.
        if spy == "wa2":  # a job from its scheduler
            deployment.schedulers["a"].scheduler.bus.publish_raw(topics.jobs("wa2"), b"marker")
        else:  # a request from a workbench, which writes to any group
            with deployment.client("carol") as carol:
                carol.bus.publish_raw(topics.to_group(topics.submit("carol"), "c"), b"marker")
        seen.wait_for(lambda msgs: any(p == b"marker" for _, p in msgs))
    finally:
        bus.stop()
    received = seen.messages
    assert all(topics.parse(topic).group is None for topic, _ in received), received
    assert all(handle.artifact_id.encode() not in payload for _, payload in received)


def test_a_groups_scheduler_cannot_send_jobs_into_the_other_group(deployment: Deployment) -> None:
    inbox = MessageRecorder()
    witness = deployment.raw("wb2", inbox, [topics.worker_inbox("wb2")], group="b")
    try:
        forged = job_ready(artifact_id="forged", project="pb")
        # Spelled in b's namespace, which a bus of group a sends as it is.
        sent = deployment.schedulers["a"].scheduler.bus
        sent.publish(topics.to_group(topics.jobs("wb2"), "b"), forged)
        assert sent.flush(TIMEOUT)  # the broker has answered it (and dropped it)
        deployment.schedulers["b"].scheduler.bus.publish_raw(topics.jobs("wb2"), b"marker")
        received = inbox.wait_for(lambda msgs: any(p == b"marker" for _, p in msgs))
    finally:
        witness.stop()
    assert [payload for _, payload in received] == [b"marker"]


def test_nobody_but_a_projects_scheduler_writes_its_directory_entry(
    deployment: Deployment,
) -> None:
    assert directory_of(deployment, "pa").group == "a"
    lie = DirectoryEntry(project="pa", group="b", scheduler="sched-b")
    with deployment.client("alice") as alice:  # a workbench
        alice.bus.publish_raw(topics.directory("pa"), encode(lie), retain=True)
        assert alice.bus.flush(TIMEOUT)
    other = deployment.schedulers["b"].scheduler.bus  # another group's scheduler
    other.publish_raw(topics.directory("pa"), encode(lie), retain=True)
    assert other.flush(TIMEOUT)
    assert directory_of(deployment, "pa").group == "a"
    with deployment.client("carol") as carol:
        assert carol.group_of("pa") == "a"
