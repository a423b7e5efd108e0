"""Topics and the codec: builders ↔ parse, strict decoding, and hypothesis round trips/fuzz."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from flotta_mqtt.model import (
    ArtifactState,
    Collect,
    Distribute,
    Finalize,
    Initialize,
    Iterate,
    JobRole,
    JobState,
    Operation,
    Pairwise,
    Parallel,
    RoundRobin,
    Sequential,
)
from flotta_mqtt.model.ids import GROUP
from flotta_mqtt.protocol import (
    MAX_MESSAGE_BYTES,
    Artifact,
    ArtifactStatus,
    CancelArtifact,
    CancelJob,
    DirectoryEntry,
    EventAck,
    EventBatch,
    JobAccepted,
    JobBatch,
    JobFailed,
    JobFinished,
    JobHeartbeat,
    JobProgress,
    JobReady,
    JobRef,
    JobStarted,
    LocksReleased,
    NodePresence,
    ProtocolError,
    PruneReport,
    PruneRequest,
    RemoteError,
    RequestRejected,
    Resource,
    SessionClaim,
    SessionProbe,
    StatusRequest,
    decode,
    encode,
    encode_batches,
    messages,
    schedules,
    topics,
    unbatch,
)
from flotta_mqtt.protocol.codec import PAYLOADS
from flotta_mqtt.protocol.schedules import (
    ScheduleAdd,
    ScheduleInfo,
    ScheduleList,
    ScheduleRemove,
    ScheduleReport,
)
from flotta_mqtt.protocol.topics import Address, Channel, TopicError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ---------------------------------------------------------------------------

safe_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", fullmatch=True)
short_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True)
sha256s = st.text("0123456789abcdef", min_size=64, max_size=64)
tokens = st.text("0123456789abcdef", min_size=32, max_size=32)
job_ids = st.integers(min_value=0, max_value=2**40)
attempts = st.integers(min_value=1, max_value=1000)
# Finite: JSON has no infinity (see test_non_finite_timestamps_do_not_survive_encoding).
timestamps = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
texts = st.text(max_size=40)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(texts, json_values, max_size=4)

operations = st.builds(
    Operation, name=st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True), params=json_objects
)
resources = st.builds(
    Resource,
    url=st.text(min_size=1, max_size=80),
    sha256=sha256s,
    size=st.integers(min_value=0, max_value=2**50),
    media_type=texts,
)
remote_errors = st.builds(RemoteError, type=texts, message=texts, traceback=texts)
job_refs = st.builds(JobRef, artifact_id=safe_ids, job_id=job_ids, attempt=attempts)

# Steps draw from a few prebuilt operations (random params are covered by JobReady):
# drawing models field by field for every step is slow.
step_operations = st.sampled_from(
    [
        Operation(name="load"),
        Operation(name="count", params={"column": "x", "where": [{"gt": 0.5}]}),
        Operation(name="mean.v2", params={"weights": None, "n": 3}),
    ]
)
distributions = st.sampled_from(
    [None, None, None, Collect(), Distribute(), Pairwise(), RoundRobin()]
)
op_steps = st.builds(
    lambda cls, op, dist: cls(op, dist),
    st.sampled_from([Initialize, Parallel, Sequential, Finalize]),
    step_operations,
    distributions,
)
steps = st.recursive(
    op_steps,
    lambda inner: st.builds(
        lambda rounds, body, dist: Iterate(rounds, body, distribution=dist),
        st.integers(min_value=1, max_value=5),
        st.lists(inner, min_size=1, max_size=3),
        distributions,
    ),
    max_leaves=6,
)


@st.composite
def artifacts(draw: st.DrawFn) -> Artifact:
    try:
        return Artifact(
            id=draw(safe_ids),
            project=draw(safe_ids),
            steps=draw(st.lists(steps, min_size=1, max_size=4)),
            seed=draw(st.integers(min_value=0, max_value=2**63 - 1)),
        )
    except ValidationError:  # distributions that cannot join their steps
        assume(False)
        raise


job_readies = st.builds(
    JobReady,
    artifact_id=safe_ids,
    job_id=job_ids,
    attempt=attempts,
    project=safe_ids,
    seed=st.integers(min_value=-(2**63), max_value=2**63),
    step=texts,
    kind=texts,
    role=st.sampled_from(JobRole),
    iteration=st.integers(min_value=0, max_value=10**6),
    operation=operations,
    inputs=st.lists(resources, max_size=3),
)


MESSAGES: dict[type[BaseModel], tuple[Callable[[str], str], st.SearchStrategy[Any]]] = {
    Artifact: (topics.submit, artifacts()),
    CancelArtifact: (topics.cancel, st.builds(CancelArtifact, artifact_id=safe_ids, reason=texts)),
    StatusRequest: (topics.ask, st.builds(StatusRequest, artifact_id=safe_ids)),
    RequestRejected: (
        topics.reply,
        st.builds(
            RequestRejected,
            topic=texts,
            error=texts,
            artifact_id=st.none() | safe_ids,
            reason=st.sampled_from(["invalid", "unknown_artifact", "quota", "forbidden"]),
        ),
    ),
    PruneRequest: (
        topics.prune,
        st.builds(PruneRequest, older_than=st.floats(min_value=0, max_value=1e9)),
    ),
    PruneReport: (
        topics.reply,
        st.builds(
            PruneReport,
            older_than=st.floats(min_value=0, max_value=1e9),
            pruned=st.integers(min_value=0, max_value=2**31),
            artifact_ids=st.lists(safe_ids, max_size=5),
        ),
    ),
    ArtifactStatus: (
        lambda artifact_id: topics.status("owner", artifact_id),
        st.builds(
            ArtifactStatus,
            artifact_id=safe_ids,
            project=texts,
            state=st.sampled_from(ArtifactState),
            seq=st.integers(min_value=0, max_value=2**62),
            total=st.integers(min_value=0, max_value=2**31),
            counts=st.dictionaries(st.sampled_from(JobState), st.integers(-(2**31), 2**31)),
            error=st.none() | remote_errors,
            failed_job=st.none() | job_ids,
            results=st.lists(resources, max_size=3),
            updated_at=timestamps,
        ),
    ),
    LocksReleased: (
        lambda artifact_id: topics.locks("owner", artifact_id),
        st.builds(LocksReleased, artifact_id=safe_ids, locks=st.lists(st.tuples(job_ids, job_ids))),
    ),
    JobReady: (topics.jobs, job_readies),
    JobBatch: (
        topics.jobs,
        st.builds(JobBatch, jobs=st.lists(job_readies, min_size=1, max_size=3)),
    ),
    EventAck: (topics.control, st.builds(EventAck, jobs=st.lists(job_refs, max_size=5))),
    CancelJob: (topics.control, st.builds(CancelJob, job=job_refs)),
    JobAccepted: (topics.events, st.builds(JobAccepted, job=job_refs)),
    JobStarted: (topics.events, st.builds(JobStarted, job=job_refs, at=timestamps)),
    JobProgress: (
        topics.events,
        st.builds(
            JobProgress,
            job=job_refs,
            fraction=st.none() | st.floats(min_value=0, max_value=1),
            message=texts,
        ),
    ),
    JobHeartbeat: (
        topics.events,
        st.builds(JobHeartbeat, jobs=st.lists(job_refs, max_size=5), at=timestamps),
    ),
    JobFinished: (
        topics.events,
        st.builds(
            JobFinished,
            job=job_refs,
            product=resources,
            started_at=timestamps,
            finished_at=timestamps,
        ),
    ),
    JobFailed: (
        topics.events,
        st.builds(JobFailed, job=job_refs, error=remote_errors, finished_at=timestamps),
    ),
    NodePresence: (
        topics.presence,
        st.builds(
            NodePresence,
            node=safe_ids,
            online=st.booleans(),
            initiator=st.booleans(),
            projects=st.lists(safe_ids, max_size=3),
            labels=st.dictionaries(texts, texts, max_size=3),
            operations=st.lists(texts, max_size=3),
            max_jobs=st.integers(min_value=1, max_value=1000),
            details=json_objects,
            since=timestamps,
        ),
    ),
}

MESSAGES[SessionClaim] = (
    topics.session,
    st.builds(
        SessionClaim,
        client=safe_ids,
        session=tokens,
        host=st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=255),
        pid=st.integers(min_value=0, max_value=2**31),
        since=timestamps,
        keepalive=st.integers(min_value=1, max_value=3600),
        will=st.none() | sha256s,
    ),
)
MESSAGES[SessionProbe] = (topics.session, st.builds(SessionProbe, nonce=tokens))
schedule_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
crons = st.sampled_from(["* * * * *", "*/5 1-3 * * mon-fri", "0 0 1,15 * 0", "30 2 29 feb *"])
MESSAGES[ScheduleAdd] = (
    topics.schedule,
    st.builds(ScheduleAdd, schedule_id=schedule_ids, cron=crons, artifact=artifacts()),
)
MESSAGES[ScheduleRemove] = (topics.schedule, st.builds(ScheduleRemove, schedule_id=schedule_ids))
MESSAGES[ScheduleList] = (topics.schedule, st.just(ScheduleList()))
MESSAGES[ScheduleReport] = (
    topics.reply,
    st.builds(
        ScheduleReport,
        action=st.sampled_from(["add", "remove", "list"]),
        schedules=st.lists(
            st.builds(
                ScheduleInfo,
                schedule_id=schedule_ids,
                owner=safe_ids,
                cron=crons,
                project=texts,
                next_run=timestamps,
                runs=st.integers(min_value=0, max_value=2**31),
            ),
            max_size=3,
        ),
        total=st.integers(min_value=0, max_value=2**31),
    ),
)
MESSAGES[DirectoryEntry] = (
    topics.directory,
    st.builds(
        DirectoryEntry,
        project=safe_ids,
        group=st.from_regex(GROUP, fullmatch=True),
        scheduler=safe_ids,
    ),
)

worker_events = st.one_of(*(how for build, how in MESSAGES.values() if build is topics.events))
MESSAGES[EventBatch] = (
    topics.events,
    st.builds(EventBatch, events=st.lists(worker_events, min_size=1, max_size=3)),
)

BUILDERS: dict[Channel, Callable[[str], str]] = {
    Channel.SUBMIT: topics.submit,
    Channel.CANCEL: topics.cancel,
    Channel.ASK: topics.ask,
    Channel.PRUNE: topics.prune,
    Channel.SCHEDULE: topics.schedule,
    Channel.REPLY: topics.reply,
    Channel.STATUS: lambda artifact_id: topics.status("owner", artifact_id),
    Channel.LOCKS: lambda artifact_id: topics.locks("owner", artifact_id),
    Channel.JOBS: topics.jobs,
    Channel.CONTROL: topics.control,
    Channel.EVENTS: topics.events,
    Channel.PRESENCE: topics.presence,
    Channel.SESSION: topics.session,
    Channel.DIRECTORY: topics.directory,
}
any_topic = st.builds(
    lambda build, name: build(name), st.sampled_from(list(BUILDERS.values())), short_ids
)


def ref() -> JobRef:
    return JobRef(artifact_id="art-1", job_id=4, attempt=2)


# --- topics -------------------------------------------------------------------------------


def test_every_channel_has_a_builder() -> None:
    assert set(BUILDERS) == set(Channel)


@SETTINGS
@given(channel=st.sampled_from(Channel), name=safe_ids)
def test_builders_and_parse_round_trip(channel: Channel, name: str) -> None:
    topic = BUILDERS[channel](name)
    assert topic.startswith((topics.ROOT + "/", topics.DIRECTORY + "/"))
    assert topics.parse(topic) == Address(channel, name)


def test_builders_spell_the_documented_layout() -> None:
    root = f"flotta/v{topics.PROTOCOL_VERSION}"
    assert root == topics.ROOT
    assert topics.submit("c") == f"{root}/requests/c/submit"
    assert topics.cancel("c") == f"{root}/requests/c/cancel"
    assert topics.prune("c") == f"{root}/requests/c/prune"
    assert topics.reply("c") == f"{root}/replies/c"
    assert topics.status("o", "a") == f"{root}/artifacts/o/a/status"
    assert topics.locks("o", "a") == f"{root}/artifacts/o/a/locks"
    assert topics.jobs("w") == f"{root}/workers/w/jobs"
    assert topics.control("w") == f"{root}/workers/w/control"
    assert topics.events("w") == f"{root}/events/w"
    assert topics.presence("n") == f"{root}/presence/n"
    assert topics.session("n") == f"{root}/sessions/n"


@pytest.mark.parametrize(
    ("filter_", "matches"),
    [
        (topics.ALL_REQUESTS, [topics.submit("c"), topics.cancel("c"), topics.prune("c")]),
        (topics.ALL_EVENTS, [topics.events("w")]),
        (topics.ALL_PRESENCE, [topics.presence("n")]),
        (topics.ALL_STATUS, [topics.status("o", "a")]),
        (topics.status("+", "a"), [topics.status("o", "a"), topics.status("p", "a")]),
        (topics.worker_inbox("w"), [topics.jobs("w"), topics.control("w")]),
    ],
)
def test_subscription_filters_match_their_topics(filter_: str, matches: list[str]) -> None:
    for topic in matches:
        assert mqtt.topic_matches_sub(filter_, topic), (filter_, topic)
    assert not mqtt.topic_matches_sub(filter_, topics.reply("other-client"))


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "flotta",
        "flotta/v1",
        "flotta/v1/",
        "flotta/v2/events/w",
        "other/v1/events/w",
        "/flotta/v1/events/w",
        "flotta/v1/events/",
        "flotta/v1/events/w/extra",
        "flotta/v1/presence",
        "flotta/v1/replies//",
        "flotta/v1/unknown/x",
        "flotta/v1/requests/c/other",
        "flotta/v1/requests//submit",
        "flotta/v1/artifacts/a/jobs",
        "flotta/v1/artifacts/a/status",
        "flotta/v1/artifacts//a/status",
        "flotta/v1/artifacts/o/a/jobs",
        "flotta/v1/workers/w/status",
        "flotta/v1/workers/w/jobs/more",
        "flotta/v1/workers/w",
    ],
)
def test_parse_rejects_foreign_and_malformed_topics(topic: str) -> None:
    with pytest.raises(TopicError, match="topic"):
        topics.parse(topic)


# --- decode: strict validation ----------------------------------------------------------------


VALID = {
    Channel.SUBMIT: Artifact(id="art-1", project="p", steps=[Parallel(Operation(name="count"))]),
    Channel.CANCEL: CancelArtifact(artifact_id="art-1"),
    Channel.ASK: StatusRequest(artifact_id="art-1"),
    Channel.PRUNE: PruneRequest(older_than=86400),
    Channel.REPLY: RequestRejected(topic="t", error="bad"),
    Channel.STATUS: ArtifactStatus(
        artifact_id="art-1", project="p", state=ArtifactState.RUNNING, seq=1, total=2, updated_at=1
    ),
    Channel.LOCKS: LocksReleased(artifact_id="art-1", locks=[(0, 1)]),
    Channel.JOBS: JobReady(
        artifact_id="art-1",
        job_id=4,
        attempt=2,
        project="p",
        seed=1,
        step="s",
        kind="parallel",
        role=JobRole.LOCAL,
        iteration=0,
        operation=Operation(name="count"),
    ),
    Channel.SCHEDULE: ScheduleRemove(schedule_id="nightly"),
    Channel.CONTROL: CancelJob(job=ref()),
    Channel.EVENTS: JobStarted(job=ref(), at=5.0),
    Channel.PRESENCE: NodePresence(node="n", online=True, since=1.0),
    Channel.SESSION: SessionClaim(
        client="n", session="0" * 32, host="h", pid=1, since=1.0, keepalive=15
    ),
    Channel.DIRECTORY: DirectoryEntry(project="p", group="g", scheduler="s"),
}


def test_every_channel_has_a_valid_example() -> None:
    assert set(VALID) == set(Channel)


@pytest.mark.parametrize("channel", list(Channel))
def test_decode_accepts_a_valid_message_on_its_channel(channel: Channel) -> None:
    message = VALID[channel]
    topic = BUILDERS[channel]("x-1")
    assert decode(topic, encode(message)) == (Address(channel, "x-1"), message)


@pytest.mark.parametrize("channel", list(Channel))
@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"\xff\xfe\x00", b"null", b"[]", b"42", b'"text"', b"{", b"{}"],
)
def test_decode_rejects_garbage(channel: Channel, payload: bytes) -> None:
    with pytest.raises(ProtocolError, match=f"invalid {channel} message"):
        decode(BUILDERS[channel]("x"), payload)


@pytest.mark.parametrize("channel", list(Channel))
def test_decode_rejects_an_extra_field_and_names_it(channel: Channel) -> None:
    data = json.loads(encode(VALID[channel]))
    data["sneaky_extra"] = 1
    with pytest.raises(ProtocolError, match="sneaky_extra"):
        decode(BUILDERS[channel]("x"), json.dumps(data).encode())


@pytest.mark.parametrize(
    ("channel", "path", "bad", "named"),
    [
        (Channel.JOBS, ["job_id"], "four", "job_id"),
        (Channel.JOBS, ["attempt"], 0, "attempt"),
        (Channel.JOBS, ["artifact_id"], "../etc", "artifact_id"),
        (Channel.JOBS, ["role"], "boss", "role"),
        (Channel.JOBS, ["operation", "name"], "Bad Name", "operation.name"),
        (Channel.EVENTS, ["job", "attempt"], "x", "job.attempt"),
        (Channel.EVENTS, ["at"], -1, "at"),
        (Channel.EVENTS, ["event"], "exploded", "event"),
        (Channel.CONTROL, ["type"], "reboot", "type"),
        (Channel.STATUS, ["state"], "sleeping", "state"),
        (Channel.STATUS, ["seq"], -1, "seq"),
        (Channel.PRESENCE, ["online"], "maybe", "online"),
        (Channel.PRESENCE, ["max_jobs"], 0, "max_jobs"),
        (Channel.SESSION, ["session"], "not hex", "session"),
        (Channel.SESSION, ["keepalive"], 0, "keepalive"),
        (Channel.SESSION, ["host"], "h\x1b[2J", "host"),  # it is shown in errors
        (Channel.SESSION, ["type"], "steal", "type"),
        (Channel.SUBMIT, ["steps"], [], "steps"),
        (Channel.SUBMIT, ["version"], 2, "version"),
        (Channel.LOCKS, ["locks"], [[1]], "locks"),
        (Channel.PRUNE, ["older_than"], -1, "older_than"),
        (Channel.PRUNE, ["older_than"], 1e12, "older_than"),
        (Channel.PRUNE, ["older_than"], "7d", "older_than"),
    ],
)
def test_decode_rejects_a_wrong_type_and_names_the_field(
    channel: Channel, path: list[str], bad: object, named: str
) -> None:
    data = json.loads(encode(VALID[channel]))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises(ProtocolError) as error:
        decode(BUILDERS[channel]("x"), json.dumps(data).encode())
    assert named in str(error.value)


def test_decode_rejects_a_missing_field_and_names_it() -> None:
    data = json.loads(encode(VALID[Channel.JOBS]))
    del data["operation"]
    with pytest.raises(ProtocolError, match="operation: Field required"):
        decode(topics.jobs("w"), json.dumps(data).encode())


def test_decode_rejects_a_message_sent_on_the_wrong_channel() -> None:
    with pytest.raises(ProtocolError, match="invalid events message"):
        decode(topics.events("w"), encode(VALID[Channel.JOBS]))


def test_decode_rejects_a_foreign_topic() -> None:
    with pytest.raises(ProtocolError, match="not under"):
        decode("elsewhere/jobs", encode(VALID[Channel.JOBS]))


def test_decode_rejects_an_oversize_payload_before_parsing_it() -> None:
    payload = b" " * MAX_MESSAGE_BYTES + encode(VALID[Channel.PRESENCE])
    with pytest.raises(ProtocolError, match="over the limit"):
        decode(topics.presence("n"), payload)


def test_encode_refuses_an_oversize_message() -> None:
    big = NodePresence(node="n", online=True, since=1, details={"x": "y" * MAX_MESSAGE_BYTES})
    with pytest.raises(ProtocolError, match=r"NodePresence is \d+ bytes"):
        encode(big)


def test_decode_rejects_an_artifact_whose_distributions_do_not_fit() -> None:
    data = json.loads(encode(VALID[Channel.SUBMIT]))
    data["steps"][0]["distribution"] = {"kind": "collect"}
    with pytest.raises(ProtocolError, match="no step follows it"):
        decode(topics.submit("c"), json.dumps(data).encode())


def test_decode_survives_deeply_nested_json() -> None:
    depth = 1000
    step = '{"kind": "iterate", "rounds": 1, "steps": [' * depth
    step += '{"kind": "parallel", "operation": {"name": "x"}}' + "]}" * depth
    payload = ('{"project": "p", "steps": [' + step + "]}").encode()
    with pytest.raises(ProtocolError):
        decode(topics.submit("c"), payload)


def test_non_finite_timestamps_are_refused_when_built() -> None:
    with pytest.raises(ValidationError, match="finite"):
        JobStarted(job=ref(), at=float("inf"))


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_json_values_do_not_change_in_transit(value: float) -> None:
    try:
        payload = encode(NodePresence(node="n", online=True, since=1.0, details={"x": value}))
    except ValueError:  # ValidationError or ProtocolError: refusing it is a fine answer
        return
    assert json.loads(payload)["details"]["x"] is not None


# --- hypothesis: round trips and fuzz -------------------------------------------------------


def payload_models() -> set[type[BaseModel]]:
    """Every model some channel carries, read from the channels' JSON Schemas."""
    models: set[type[BaseModel]] = set()
    for adapter in PAYLOADS.values():
        schema = adapter.json_schema()
        options = schema.get("oneOf", []) + schema.get("anyOf", [])  # discriminated or not
        refs = [option["$ref"] for option in options] or [schema["title"]]
        names = (ref.rsplit("/", 1)[-1] for ref in refs)
        models.update(getattr(messages, name, None) or getattr(schedules, name) for name in names)
    return models


def test_every_payload_model_has_a_round_trip_strategy() -> None:
    assert payload_models() == set(MESSAGES)


@pytest.mark.parametrize("model", list(MESSAGES), ids=lambda m: m.__name__)
@SETTINGS
@given(data=st.data(), name=safe_ids)
def test_every_message_round_trips_through_encode_and_decode(
    model: type[BaseModel], data: st.DataObject, name: str
) -> None:
    build_topic, strategy = MESSAGES[model]
    message = data.draw(strategy)
    payload = encode(message)
    address, decoded = decode(build_topic(name), payload)
    assert type(decoded) is model
    assert decoded == message
    assert address.name == name
    assert encode(decoded) == payload


def _unbatched(topic: str, payloads: list[bytes]) -> list[BaseModel]:
    """What a receiver handles from these payloads: every message of every batch, in order."""
    received: list[BaseModel] = []
    for payload in payloads:
        assert len(payload) <= MAX_MESSAGE_BYTES
        received += unbatch(decode(topic, payload)[1])
    return received


@SETTINGS
@given(jobs=st.lists(job_readies, min_size=1, max_size=8))
def test_job_batches_deliver_every_job_in_order(jobs: list[JobReady]) -> None:
    payloads = encode_batches(jobs)
    assert _unbatched(topics.jobs("w"), payloads) == jobs
    if len(jobs) == 1:
        assert payloads == [encode(jobs[0])]  # one job travels as itself
    else:
        assert payloads == [encode(JobBatch(jobs=jobs))]  # what the model itself encodes to


@SETTINGS
@given(events=st.lists(worker_events, min_size=1, max_size=8))
def test_event_batches_deliver_every_event_in_order(events: list[BaseModel]) -> None:
    payloads = encode_batches(events)
    assert _unbatched(topics.events("w"), payloads) == events
    if len(events) > 1:
        assert payloads == [encode(EventBatch.model_validate({"events": events}))]


@pytest.mark.parametrize("count", [2, 9, 40])
def test_batches_split_at_the_size_limit(count: int) -> None:
    # Each event ~30 KiB: eight fit in one message, so 9 and 40 need several.
    big = RemoteError(type="E", message="x" * 30_000)
    events = [
        JobFailed(job=JobRef(artifact_id="a", job_id=i, attempt=1), error=big, finished_at=1)
        for i in range(count)
    ]
    payloads = encode_batches(events)
    assert len(payloads) == -(-count // 8)
    assert _unbatched(topics.events("w"), payloads) == events


def test_a_batch_refuses_a_message_over_the_limit_alone() -> None:
    huge = RemoteError(type="E", message="x" * MAX_MESSAGE_BYTES)
    events = [JobFailed(job=ref(), error=huge, finished_at=1), JobAccepted(job=ref())]
    with pytest.raises(ProtocolError, match=r"JobFailed is \d+ bytes"):
        encode_batches(events)


def test_an_empty_batch_is_refused() -> None:
    with pytest.raises(ProtocolError, match="at least 1"):
        decode(topics.jobs("w"), b'{"type":"job_batch","jobs":[]}')


def _decodes_or_refuses(topic: str, payload: bytes) -> None:
    try:
        address, message = decode(topic, payload)
    except ProtocolError:
        return
    assert address == topics.parse(topic)
    assert isinstance(message, BaseModel)


@SETTINGS
@given(topic=any_topic, payload=st.binary(max_size=300))
def test_random_bytes_decode_or_raise_protocol_error(topic: str, payload: bytes) -> None:
    _decodes_or_refuses(topic, payload)


@SETTINGS
@given(topic=any_topic, value=json_values)
def test_random_json_decodes_or_raises_protocol_error(topic: str, value: object) -> None:
    _decodes_or_refuses(topic, json.dumps(value).encode())


@SETTINGS
@given(channel=st.sampled_from(Channel), data=st.data())
def test_mutated_valid_messages_decode_or_raise_protocol_error(
    channel: Channel, data: st.DataObject
) -> None:
    """Replace one field anywhere in a valid message with random JSON."""
    message = json.loads(encode(VALID[channel]))
    target: Any = message
    while True:
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = target[key]
        if isinstance(child, dict | list) and child and data.draw(st.booleans()):
            target = child
            continue
        target[key] = data.draw(json_values)
        break
    _decodes_or_refuses(BUILDERS[channel]("x"), json.dumps(message).encode())


def _json_values(floats: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5) | floats
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=20,
    )


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return any(_non_finite(item) for item in items)


@given(st.dictionaries(st.text(max_size=5), _json_values(st.floats()), max_size=4))
def test_params_are_refused_exactly_when_a_number_anywhere_in_them_is_not_finite(
    params: dict[str, Any],
) -> None:
    """However deep an inf or nan sits in a job's params, it is refused; all else is kept."""
    if _non_finite(params):
        with pytest.raises(ValidationError, match="is not a finite number"):
            Operation(name="op", params=params)
    else:
        assert Operation(name="op", params=params).params == params
