"""Scheduler groups: topic namespaces per group on one broker and one store.

The mapping between protocol topics and a group's namespace (property tests), the
registry's and the scheduler's rules, the ACL a registry with groups generates, and two
groups side by side on one in-memory broker: each project's artifacts complete in the
group serving it, found by the workbench from the project alone, and nothing of one
group reaches the other's nodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import MessageRecorder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner, Result

from flotta_mqtt import Artifact, Client, Collect, Compare, Finalize, Operation, Parallel
from flotta_mqtt.broker.identities import IdentitySpec, render_acl, rights
from flotta_mqtt.cli.main import app
from flotta_mqtt.model import ArtifactState, Registry
from flotta_mqtt.model.ids import GROUP
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import DirectoryEntry, decode, topics
from flotta_mqtt.protocol.topics import Address, Channel, TopicError
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.scheduler.groups import Served
from flotta_mqtt.transport.memory import MemoryBroker, MemoryBus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import ResourceRefused, ResourceStore
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

TIMEOUT = 20.0
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

groups = st.from_regex(GROUP, fullmatch=True)
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
BUILDERS = [
    topics.submit,
    topics.cancel,
    topics.ask,
    topics.prune,
    topics.reply,
    lambda name: topics.status("owner", name),
    lambda name: topics.locks("owner", name),
    topics.jobs,
    topics.control,
    topics.events,
    topics.presence,
    topics.session,
]
FILTERS = [topics.ALL_REQUESTS, topics.ALL_EVENTS, topics.ALL_PRESENCE, topics.ALL_STATUS]
protocol_topics = st.one_of(
    st.builds(lambda build, name: build(name), st.sampled_from(BUILDERS), names),
    st.sampled_from(FILTERS),
)


# --- the mapping ------------------------------------------------------------------------------


@SETTINGS
@given(topic=protocol_topics, group=groups)
def test_a_protocol_topic_moves_into_its_group_and_back(topic: str, group: str) -> None:
    inside = topics.to_group(topic, group)
    assert inside.startswith(f"flotta/v1-{group}/")
    assert topics.from_group(inside, group) == topic
    assert topics.to_group(topic, None) == topics.from_group(topic, None) == topic
    if "+" not in topic:  # a topic, not a filter: it parses to the same address, in its group
        address = topics.parse(topic)
        assert topics.parse(inside) == Address(address.channel, address.name, group)


@SETTINGS
@given(topic=protocol_topics, mine=groups, theirs=groups)
def test_another_groups_topic_is_never_mapped(topic: str, mine: str, theirs: str) -> None:
    """A bus of group `mine` neither moves nor strips a topic of group `theirs`: what it
    publishes there, or receives from there, keeps naming `theirs`."""
    foreign = topics.to_group(topic, theirs)
    assert topics.to_group(foreign, mine) == foreign
    if mine != theirs:
        assert topics.from_group(foreign, mine) == foreign


@SETTINGS
@given(topic=st.text(max_size=60), group=groups)
def test_nothing_outside_the_protocol_root_is_mapped(topic: str, group: str) -> None:
    if topic != topics.ROOT and not topic.startswith(topics.ROOT + "/"):
        assert topics.to_group(topic, group) == topic
    namespace = topics.root(group)
    if topic != namespace and not topic.startswith(namespace + "/"):
        assert topics.from_group(topic, group) == topic


BY_CHANNEL = {
    Channel.SUBMIT: topics.submit,
    Channel.CANCEL: topics.cancel,
    Channel.ASK: topics.ask,
    Channel.PRUNE: topics.prune,
    Channel.REPLY: topics.reply,
    Channel.JOBS: topics.jobs,
    Channel.CONTROL: topics.control,
    Channel.EVENTS: topics.events,
    Channel.PRESENCE: topics.presence,
    Channel.SESSION: topics.session,
    Channel.DIRECTORY: topics.directory,
}
levels = st.one_of(
    st.sampled_from(["flotta", "v1", "v1-a", "v1-", "v2-a", "directory", "requests", "submit"]),
    st.sampled_from(["replies", "workers", "jobs", "artifacts", "status", "+", "#", ""]),
    st.text(max_size=8),
)


@SETTINGS
@given(parts=st.lists(levels, min_size=1, max_size=6))
def test_parse_accepts_only_what_the_builders_spell(parts: list[str]) -> None:
    """Whatever parses is exactly the topic a builder spells for its channel, name and
    group: nothing else is read as a protocol topic."""
    topic = "/".join(parts)
    try:
        address = topics.parse(topic)
    except TopicError:
        return
    if address.channel in (Channel.STATUS, Channel.LOCKS):
        owner = topic.split("/")[3]
        build = topics.status if address.channel is Channel.STATUS else topics.locks
        assert topics.to_group(build(owner, address.name), address.group) == topic
    else:
        assert topics.to_group(BY_CHANNEL[address.channel](address.name), address.group) == topic


def test_the_directory_is_in_no_group() -> None:
    entry = topics.directory("oncology")
    assert entry == "flotta/directory/v1/oncology"
    assert topics.to_group(entry, "a") == entry
    assert topics.parse(entry) == Address(Channel.DIRECTORY, "oncology")


@pytest.mark.parametrize(
    "topic",
    [
        "flotta/v1-/replies/x",  # an empty group
        "flotta/v1-a+b/replies/x",  # a wildcard in it
        "flotta/v1-a b/replies/x",
        "flotta/v2-a/replies/x",  # another protocol version
        "flotta/v1a/replies/x",
        "flotta/directory/v1/a/b",
        "flotta/directory/v1/",
    ],
)
def test_parse_refuses_malformed_namespaces(topic: str) -> None:
    with pytest.raises(TopicError, match="topic"):
        topics.parse(topic)


def test_a_group_name_must_be_a_safe_level() -> None:
    for bad in ("", "a/b", "+", "#", "-a", "a" * 65):
        with pytest.raises(ValidationError, match="group"):
            BrokerSettings(group=bad)
    assert BrokerSettings(group="team-1.eu").group == "team-1.eu"


# --- the registry and the scheduler's rules ---------------------------------------------------

REGISTRY = Registry.model_validate(
    {
        "scheduler": "scheduler",
        "groups": {
            "a": {"scheduler": "sched-a", "projects": ["pa"]},
            "b": {"scheduler": "sched-b", "projects": ["pb"]},
        },
        "workers": {
            "wa": {"projects": ["pa"], "group": "a"},
            "wb": {"projects": ["pb"], "group": "b"},
            "w0": {"projects": ["p0"]},
        },
        "workbenches": {"alice": {}},
    }
)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {
                "groups": {
                    "a": {"scheduler": "s", "projects": ["p"]},
                    "b": {"scheduler": "t", "projects": ["p"]},
                }
            },
            "project p is in groups a and b",
        ),
        (
            {
                "groups": {"a": {"scheduler": "s", "projects": ["p"]}},
                "workers": {"w": {"projects": ["p"]}},
            },
            "worker w is in the default group but holds project p of group a",
        ),
        (
            {
                "groups": {"a": {"scheduler": "s"}},
                "workers": {"w": {"projects": ["q"], "group": "a"}},
            },
            "worker w is in group a but holds project q of the default group",
        ),
        ({"workers": {"w": {"group": "z"}}}, "worker w is in group z, which is not listed"),
        ({"groups": {"a": {"scheduler": "scheduler"}}}, "named more than once: scheduler"),
    ],
)
def test_the_registry_keeps_groups_apart(change: dict[str, object], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        Registry.model_validate(change)


def config(
    group: str | None, name: str = "sched-a", projects: list[str] | None = None
) -> SchedulerConfig:
    return SchedulerConfig(
        name=name, broker=BrokerSettings(group=group), projects=projects or [], run_initiator=False
    )


def test_a_scheduler_serves_its_groups_projects_and_names_the_group_of_others() -> None:
    served = Served.of(config("a"), REGISTRY)
    assert served.projects == {"pa"}  # from the registry
    assert served.refusal("pa") is None
    assert served.refusal("pb") == (
        "project pb is not served by group a (scheduler sched-a): group b serves it"
    )
    assert "the default group serves it" in (served.refusal("p0") or "")
    default = Served.of(config(None, "scheduler"), REGISTRY)
    assert default.refusal("p0") is None
    assert "group a serves it" in (default.refusal("pa") or "")
    [(topic, entry, retain)] = served.entries()
    assert (topic, retain) == ("flotta/directory/v1/pa", True)
    assert entry == DirectoryEntry(project="pa", group="a", scheduler="sched-a")
    assert default.entries() == []


def test_a_scheduler_without_a_registry_serves_the_projects_it_is_given() -> None:
    served = Served.of(config("a", projects=["pa", "pc"]), None)
    assert served.refusal("pc") is None
    assert served.refusal("pb") == (
        "project pb is not served by group a (scheduler sched-a): it serves pa, pc"
    )
    assert Served.of(config(None, "scheduler"), None).refusal("anything") is None


@pytest.mark.parametrize(
    ("scheduler", "error"),
    [
        (config("a", "sched-b"), "the registry names sched-a as group a's scheduler"),
        (config("a", projects=["pb"]), r"projects \['pb'\] are not group a's in the registry"),
        (config("z", "sched-z"), "group z is not one of the registry's groups"),
    ],
)
def test_a_scheduler_disagreeing_with_the_registry_does_not_start(
    scheduler: SchedulerConfig, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        Served.of(scheduler, REGISTRY)


# --- the ACL ------------------------------------------------------------------------------------


def matches(topic_filter: str, topic: str) -> bool:
    wanted, levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(wanted):
        if level == "#":
            return True
        if i >= len(levels) or level not in ("+", levels[i]):
            return False
    return len(wanted) == len(levels)


def may(node: str, access: str, topic: str) -> bool:
    spec = IdentitySpec.of(REGISTRY)
    role = dict(spec.nodes())[node]
    return any(r.access == access and matches(r.topic, topic) for r in rights(role, node, spec))


def test_the_acl_keeps_a_groups_nodes_in_its_namespace() -> None:
    assert "user sched-a" in render_acl(IdentitySpec.of(REGISTRY))
    every_topic = [build("x") for build in BUILDERS]
    for node in ("wa", "sched-a", "sched-a.initiator"):
        for topic in every_topic:
            for group in ("b", None):  # another group's and the default group's
                elsewhere = topics.to_group(topic, group)
                assert not may(node, "read", elsewhere), (node, elsewhere)
                assert not may(node, "write", elsewhere), (node, elsewhere)
    assert may("wa", "read", topics.to_group(topics.jobs("wa"), "a"))
    assert may("sched-a", "write", topics.to_group(topics.jobs("wa"), "a"))
    assert not may("sched-a", "write", topics.to_group(topics.jobs("wb"), "b"))
    assert may("sched-a", "write", topics.directory("pa"))
    assert not may("sched-a", "write", topics.directory("pb"))
    # The default group's scheduler stays out of the groups too.
    assert not may("scheduler", "read", topics.to_group(topics.submit("alice"), "a"))
    # A workbench uses any group, reads the directory and writes none of it.
    for group in ("a", "b", None):
        assert may("alice", "write", topics.to_group(topics.submit("alice"), group))
    assert may("alice", "read", topics.directory("pa"))
    assert not may("alice", "write", topics.directory("pa"))


def test_a_groups_store_lies_under_its_prefix_and_reads_nothing_of_another(
    tmp_path: Path,
) -> None:
    storage = StorageSettings(url=tmp_path.as_uri())
    a, b = ResourceStore.of(storage, "a"), ResourceStore.of(storage, "b")
    assert a.artifact_root("x") == f"{tmp_path.as_uri()}/groups/a/artifacts/x"
    theirs = b.put(b.product_url("x", "0", 1), b'{"secret": 1}')
    with pytest.raises(ResourceRefused, match="not a key under"):
        a.get(theirs)
    assert b.get(theirs) == b'{"secret": 1}'


# --- two groups on one broker ---------------------------------------------------------------

ROWS = {"wa": 7, "wb": 11}  # rows over 0.5, each worker's own count


@dataclass
class Groups:
    broker: MemoryBroker
    storage: StorageSettings
    nodes: list[SchedulerNode]
    workers: list[WorkerAgent]
    seen: dict[str, MessageRecorder]  # group → everything a spy in its namespace received

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for node in self.nodes:
            node.stop()


@pytest.fixture
def two_groups(memory_broker: MemoryBroker, tmp_path: Path) -> Iterator[Groups]:
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY.model_dump_json())
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    seen = {group: MessageRecorder() for group in ("a", "b")}
    spies = [
        MemoryBus(
            f"spy-{group}",
            memory_broker.broker_settings(group=group),
            seen[group],
            ["flotta/v1/#"],  # mapped: all of its group's namespace
            clean=True,
        ).start(wait=TIMEOUT)
        for group in seen
    ]
    directory = MessageRecorder()
    watcher = MemoryBus(
        "watcher", memory_broker.broker_settings(), directory, [topics.directory("+")], clean=True
    ).start(wait=TIMEOUT)
    groups = Groups(memory_broker, storage, [], [], seen)
    for group, worker in (("a", "wa"), ("b", "wb")):
        broker = memory_broker.broker_settings(group=group)
        groups.nodes.append(
            SchedulerNode(
                SchedulerConfig(
                    name=f"sched-{group}",
                    broker=broker,
                    storage=storage,
                    database=tmp_path / f"sched-{group}.db",
                    registry=registry,
                    worker_grace=0.5,
                )
            ).start(wait=TIMEOUT)
        )
        data = tmp_path / f"{worker}.csv"
        data.write_text("x\n" + "1\n" * ROWS[worker] + "0\n" * 5)
        project = f"p{group}"
        config = WorkerConfig(
            name=worker,
            broker=broker,
            storage=storage,
            datasets={project: {"paths": [data], "privacy": {"exact": True}}},
            state_dir=tmp_path / f"{worker}.state",
        )
        groups.workers.append(WorkerAgent(config).start(wait=TIMEOUT))
    # Both schedulers have named their groups in the directory (retained) before anyone asks.
    directory.wait_for(
        lambda msgs: {t for t, _ in msgs} >= {"flotta/directory/v1/pa", "flotta/directory/v1/pb"}
    )
    watcher.stop()
    try:
        yield groups
    finally:
        groups.stop()
        for spy in spies:
            spy.stop()


COUNT = Operation(
    name="count", params={"where": Compare(column="x", op=">", value=0.5).model_dump()}
)


def count(project: str) -> Artifact:
    return Artifact(
        project=project, steps=[Parallel(COUNT, Collect()), Finalize(Operation(name="count"))]
    )


def test_each_project_completes_in_its_group_found_from_the_project_alone(
    two_groups: Groups,
) -> None:
    settings = two_groups.broker.broker_settings()  # a workbench in no group
    with Client(settings, client_id="alice", storage=two_groups.storage) as client:
        handles = {p: client.submit(count(p)) for p in ("pa", "pb")}
        assert {p: h.group for p, h in handles.items()} == {"pa": "a", "pb": "b"}
        assert handles["pa"].result(timeout=TIMEOUT) == ROWS["wa"]
        assert handles["pb"].result(timeout=TIMEOUT) == ROWS["wb"]
        for project, handle in handles.items():
            status = handle.status()
            assert status is not None and status.state is ArtifactState.COMPLETED
            assert status.holders == [f"w{project[1]}"]  # its group's worker, no other
    ids = {p: h.artifact_id for p, h in handles.items()}
    for group, other in (("a", "pb"), ("b", "pa")):
        messages = two_groups.seen[group].messages
        assert messages, f"the spy of group {group} saw nothing of its own group"
        assert all(ids[other] not in payload.decode() for _, payload in messages)
        for topic, payload in messages:  # all of it in the group's own namespace
            assert topics.parse(topic).group is None  # mapped back: none of another group's
            if payload:
                decode(topic, payload)


def test_a_submission_to_the_wrong_group_is_refused_naming_the_right_one(
    two_groups: Groups,
) -> None:
    settings = two_groups.broker.broker_settings(group="b")  # fixed: every request goes to b
    with Client(settings, client_id="alice", storage=two_groups.storage) as client:
        handle = client.submit(count("pa"))
        assert handle.group == "b"
        client.wait_for(lambda: handle.refused() is not None, TIMEOUT)
        refused = handle.refused()
        assert refused is not None and refused.reason == "other_group"
        assert refused.error == (
            "project pa is not served by group b (scheduler sched-b): group a serves it"
        )


def test_a_project_with_no_directory_entry_goes_to_the_default_group(
    memory_broker: MemoryBroker,
) -> None:
    recorder = MessageRecorder()  # in the place of the default group's scheduler
    spy = MemoryBus(
        "default-scheduler", memory_broker.broker_settings(), recorder, [topics.ALL_REQUESTS]
    ).start(wait=TIMEOUT)
    try:
        with Client(memory_broker.broker_settings(), client_id="alice") as client:
            assert client.submit(count("nowhere")).group is None
            recorder.wait_for(lambda msgs: any(t == topics.submit("alice") for t, _ in msgs))
    finally:
        spy.stop()


# --- the command line ---------------------------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(
        app, list(args), env={"COLUMNS": "250", **(env or {})}, catch_exceptions=False
    )


def test_the_cli_submits_by_project_and_finds_the_artifact_by_project_or_group(
    two_groups: Groups, tmp_path: Path
) -> None:
    broker = ["--broker", two_groups.broker.url, "--username", "alice"]
    file = tmp_path / "count.json"
    file.write_text(count("pb").model_dump_json())
    submitted = invoke("submit", str(file), "--wait", *broker, "--storage", two_groups.storage.url)
    assert submitted.exit_code == 0, submitted.output
    artifact_id = submitted.output.split("submitted artifact ")[1].split()[0]
    for where in (["--project", "pb"], ["--group", "b"]):
        shown = invoke("status", artifact_id, "--output", "json", *where, *broker)
        assert shown.exit_code == 0, shown.output
        assert '"state": "completed"' in shown.output
    unknown = invoke("status", artifact_id, "--timeout", "1", *broker)  # not in the default group
    assert unknown.exit_code != 0
    dest = tmp_path / "result.json"
    fetched = invoke(
        "download",
        artifact_id,
        str(dest),
        "--project",
        "pb",
        *broker,
        "--storage",
        two_groups.storage.url,
    )
    assert fetched.exit_code == 0, fetched.output
    assert dest.read_text().strip() == str(ROWS["wb"])


def test_scheduler_and_worker_options_name_their_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import flotta_mqtt.cli.main as cli

    started: list[WorkerConfig | SchedulerConfig] = []
    monkeypatch.setattr(
        "flotta_mqtt.worker.agent.WorkerAgent", lambda config, gave_up: started.append(config)
    )
    monkeypatch.setattr(
        "flotta_mqtt.nodes.SchedulerNode", lambda config, gave_up: started.append(config)
    )
    monkeypatch.setattr(cli, "serve", lambda make, what, console: make(print))
    scheduled = invoke("scheduler", "--group", "a", "--project", "pa", "--project", "pc")
    assert scheduled.exit_code == 0, scheduled.output
    assert invoke("worker", "--name", "wa", env={"FLOTTA_GROUP": "a"}).exit_code == 0
    scheduler, worker = started
    assert isinstance(scheduler, SchedulerConfig) and isinstance(worker, WorkerConfig)
    assert (scheduler.broker.group, scheduler.projects) == ("a", ["pa", "pc"])
    assert worker.broker.group == "a"
    refused = invoke("scheduler", "--group", "a/b")
    assert refused.exit_code != 0 and "group name 'a/b'" in refused.output
