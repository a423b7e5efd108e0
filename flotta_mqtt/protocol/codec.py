"""Encoding and strict decoding of protocol messages, chosen by the topic they travel on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from flotta_mqtt.model.errors import describe
from flotta_mqtt.protocol import topics
from flotta_mqtt.protocol.messages import (
    Artifact,
    ArtifactStatus,
    CancelArtifact,
    DirectoryEntry,
    EventBatch,
    JobBatch,
    JobReady,
    LocksReleased,
    NodePresence,
    PruneRequest,
    Reply,
    SessionMessage,
    StatusRequest,
    WorkerControl,
    WorkerEvents,
    WorkerJobs,
)
from flotta_mqtt.protocol.schedules import ScheduleReport, ScheduleRequest
from flotta_mqtt.protocol.topics import Address, Channel

# Messages are small by design (payloads go to the resource store). The broker's own
# limit is larger, so an oversize message is refused here with a clear error, never by a
# PUBACK 0x95 that paho cannot parse.
MAX_MESSAGE_BYTES = 256 * 1024

# One adapter per channel, built once: decoding never rebuilds a schema per message.
PAYLOADS: dict[Channel, TypeAdapter[Any]] = {
    Channel.SUBMIT: TypeAdapter(Artifact),
    Channel.CANCEL: TypeAdapter(CancelArtifact),
    Channel.ASK: TypeAdapter(StatusRequest),
    Channel.PRUNE: TypeAdapter(PruneRequest),
    Channel.SCHEDULE: TypeAdapter(ScheduleRequest),
    Channel.REPLY: TypeAdapter(Reply | ScheduleReport),
    Channel.STATUS: TypeAdapter(ArtifactStatus),
    Channel.LOCKS: TypeAdapter(LocksReleased),
    Channel.JOBS: TypeAdapter(WorkerJobs),
    Channel.CONTROL: TypeAdapter(WorkerControl),
    Channel.EVENTS: TypeAdapter(WorkerEvents),
    Channel.PRESENCE: TypeAdapter(NodePresence),
    Channel.SESSION: TypeAdapter(SessionMessage),
    Channel.DIRECTORY: TypeAdapter(DirectoryEntry),
}


class ProtocolError(ValueError):
    """A message that cannot be accepted, and exactly why."""


def serialize(message: BaseModel) -> bytes:
    """A message's bytes on the bus, whatever their size: what encode sends, and what a
    check of a message's size before it is sent measures."""
    return message.model_dump_json(exclude_defaults=False).encode()


def encode(message: BaseModel) -> bytes:
    """Serialise a message, refusing one larger than MAX_MESSAGE_BYTES."""
    payload = serialize(message)
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            f"{type(message).__name__} is {len(payload)} bytes, over the "
            f"{MAX_MESSAGE_BYTES}-byte limit: put large data in the resource store"
        )
    return payload


# The JSON of JobBatch and EventBatch up to their list (a test holds them to the models).
_JOB_BATCH = b'{"type":"job_batch","jobs":['
_EVENT_BATCH = b'{"event":"batch","events":['


def encode_batches(messages: Sequence[BaseModel]) -> list[bytes]:
    """Payloads for messages bound for one topic: as few as the size limit allows.

    One message goes as itself; several JobReady go as JobBatch, several worker events as
    EventBatch, each batch filled up to MAX_MESSAGE_BYTES. Every message is encoded once
    and the batch is assembled around the bytes (what JobBatch/EventBatch would encode to).
    """
    if len(messages) == 1:
        return [encode(messages[0])]
    head = _JOB_BATCH if isinstance(messages[0], JobReady) else _EVENT_BATCH
    payloads: list[bytes] = []
    parts: list[bytes] = []
    size = len(head) + 2
    for message in messages:
        part = encode(message)
        if parts and size + len(part) + 1 > MAX_MESSAGE_BYTES:
            payloads.append(_join(head, parts))
            parts, size = [], len(head) + 2
        parts.append(part)
        size += len(part) + 1
    payloads.append(_join(head, parts))
    return payloads


def unbatch(message: Any) -> list[Any]:
    """The messages a decoded payload carries: a batch's, one by one, or the message itself."""
    if isinstance(message, JobBatch):
        return list(message.jobs)
    if isinstance(message, EventBatch):
        return list(message.events)
    return [message]


def _join(head: bytes, parts: list[bytes]) -> bytes:
    return parts[0] if len(parts) == 1 else head + b",".join(parts) + b"]}"


def decode(topic: str, payload: bytes) -> tuple[Address, Any]:
    """Parse and validate a message from the topic it arrived on; ProtocolError if invalid."""
    try:
        address = topics.parse(topic)
    except topics.TopicError as exc:
        raise ProtocolError(str(exc)) from None
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message on {topic} is {len(payload)} bytes, over the limit")
    try:
        message = PAYLOADS[address.channel].validate_json(payload)
    except ValidationError as exc:
        problems = describe(exc, "message")
        raise ProtocolError(f"invalid {address.channel} message on {topic}: {problems}") from None
    return address, message
