"""Reading what arrives: which artifact and job a message is about, even a request
that could not be decoded, so that logs and rejections can name them."""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError

from flotta_mqtt.model import Artifact, SafeId
from flotta_mqtt.protocol import JobRef, RequestRejected, topics
from flotta_mqtt.protocol.messages import RejectReason
from flotta_mqtt.protocol.topics import Channel
from flotta_mqtt.scheduler.effects import Event, Outgoing, Received

_SAFE_ID: TypeAdapter[str] = TypeAdapter(SafeId)
# The field naming the artifact, per request channel.
_NAMED_BY = {Channel.SUBMIT: "id", Channel.CANCEL: "artifact_id", Channel.ASK: "artifact_id"}


def message_ids(message: Any) -> dict[str, Any]:
    """The artifact and job a message is about, for the ids on every log line."""
    job = getattr(message, "job", None)
    if isinstance(job, JobRef):
        return {"artifact_id": job.artifact_id, "job_id": job.job_id, "attempt": job.attempt}
    artifact_id = getattr(message, "artifact_id", None) or (
        message.id if isinstance(message, Artifact) else None
    )
    return {"artifact_id": artifact_id} if artifact_id else {}


def named_artifact(topic: str, payload: bytes) -> str | None:
    """The artifact a request that failed to decode names, read leniently, if any: a
    submission's `id`, a cancellation's or status request's `artifact_id`."""
    try:
        channel = topics.parse(topic).channel
        data = json.loads(payload)
    except (topics.TopicError, ValueError):
        return None
    field = _NAMED_BY.get(channel)
    if field is None or not isinstance(data, dict):
        return None
    try:
        return _SAFE_ID.validate_python(data.get(field))
    except ValidationError:
        return None


def rejection(
    topic: str, error: str, artifact_id: str | None, reason: RejectReason = "invalid"
) -> Outgoing | None:
    """The answer to a request on `topic` that could not be handled, naming its artifact
    if it did; None for a message that is no request (nobody waits for an answer)."""
    try:
        address = topics.parse(topic)
    except topics.TopicError:
        return None
    if address.channel not in _REQUESTS:
        return None
    message = RequestRejected(topic=topic, error=error, artifact_id=artifact_id, reason=reason)
    return topics.reply(address.name), message, False


def refusals(events: list[Event], error: str) -> tuple[list[Outgoing], list[Event]]:
    """While nothing can be recorded: the rejections of the requests among `events` that
    would be (submissions, cancellations), saying why (`error`); and the other events,
    to be handled once it can be."""
    answers: list[Outgoing] = []
    rest: list[Event] = []
    for event in events:
        kind = _RECORDED.get(_channel(event.topic)) if isinstance(event, Received) else None
        if not isinstance(event, Received) or kind is None:
            rest.append(event)
            continue
        artifact_id = named_artifact(event.topic, event.payload)
        what = f"the {kind}{f' of {artifact_id}' if artifact_id else ''} was not recorded"
        answer = rejection(event.topic, f"{what}: {error}", artifact_id, "unavailable")
        if answer is not None:
            answers.append(answer)
    return answers, rest


# The channels of requests, answered if they cannot be handled; those that write.
_REQUESTS = (Channel.SUBMIT, Channel.CANCEL, Channel.ASK, Channel.PRUNE, Channel.SCHEDULE)
_RECORDED: dict[Channel | None, str] = {
    Channel.SUBMIT: "submission",
    Channel.CANCEL: "cancellation",
    Channel.PRUNE: "prune request",
    Channel.SCHEDULE: "schedule request",
}


def _channel(topic: str) -> Channel | None:
    try:
        return topics.parse(topic).channel
    except topics.TopicError:
        return None
