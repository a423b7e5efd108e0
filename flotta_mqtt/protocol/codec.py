"""Encoding and strict decoding of protocol messages, chosen by the topic they travel on."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from flotta_mqtt.model.errors import describe
from flotta_mqtt.protocol import topics
from flotta_mqtt.protocol.messages import (
    Artifact,
    ArtifactStatus,
    CancelArtifact,
    JobReady,
    LocksReleased,
    NodePresence,
    RequestRejected,
    WorkerControl,
    WorkerEvent,
)
from flotta_mqtt.protocol.topics import Address, Channel

# Messages are small by design (payloads go to the resource store). The broker's own
# limit is larger, so an oversize message is refused here with a clear error, never by a
# PUBACK 0x95 that paho cannot parse.
MAX_MESSAGE_BYTES = 256 * 1024

# One adapter per channel, built once: decoding never rebuilds a schema per message.
PAYLOADS: dict[Channel, TypeAdapter[Any]] = {
    Channel.SUBMIT: TypeAdapter(Artifact),
    Channel.CANCEL: TypeAdapter(CancelArtifact),
    Channel.REPLY: TypeAdapter(RequestRejected),
    Channel.STATUS: TypeAdapter(ArtifactStatus),
    Channel.LOCKS: TypeAdapter(LocksReleased),
    Channel.JOBS: TypeAdapter(JobReady),
    Channel.CONTROL: TypeAdapter(WorkerControl),
    Channel.EVENTS: TypeAdapter(WorkerEvent),
    Channel.PRESENCE: TypeAdapter(NodePresence),
}


class ProtocolError(ValueError):
    """A message that cannot be accepted, and exactly why."""


def encode(message: BaseModel) -> bytes:
    """Serialise a message, refusing one larger than MAX_MESSAGE_BYTES."""
    payload = message.model_dump_json(exclude_defaults=False).encode()
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            f"{type(message).__name__} is {len(payload)} bytes, over the "
            f"{MAX_MESSAGE_BYTES}-byte limit: put large data in the resource store"
        )
    return payload


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
