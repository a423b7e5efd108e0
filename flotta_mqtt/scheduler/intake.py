"""Reading what arrives: which artifact and job a message is about, even a request
that could not be decoded, so that logs and rejections can name them."""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError

from flotta_mqtt.model import Artifact, SafeId
from flotta_mqtt.protocol import JobRef, topics
from flotta_mqtt.protocol.topics import Channel

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
