"""Every MQTT topic of the protocol, in one place; nothing else spells a topic.

Layout (ROOT carries the protocol version, so two versions can share a broker):
  {ROOT}/requests/{client}/submit   workbench → scheduler: an Artifact
  {ROOT}/requests/{client}/cancel   workbench → scheduler: CancelArtifact
  {ROOT}/requests/{client}/status   workbench → scheduler: StatusRequest
  {ROOT}/requests/{client}/prune    workbench → scheduler: PruneRequest (administrators)
  {ROOT}/requests/{client}/schedule workbench → scheduler: ScheduleAdd, …Remove, …List
  {ROOT}/replies/{client}           scheduler → workbench: RequestRejected, PruneReport,
                                    ScheduleReport
  {ROOT}/artifacts/{owner}/{id}/status  scheduler → its owner (and viewers): ArtifactStatus
                                    (retained)
  {ROOT}/artifacts/{owner}/{id}/locks   scheduler → its owner (and viewers): LocksReleased
  {ROOT}/workers/{worker}/jobs      scheduler → one worker: JobReady, or a JobBatch of them
  {ROOT}/workers/{worker}/control   scheduler → one worker: EventAck, CancelJob
  {ROOT}/events/{worker}            one worker → scheduler: job started/…/failed, or an
                                    EventBatch of them
  {ROOT}/presence/{node}            a node → all: NodePresence (retained, last will)
  {ROOT}/sessions/{client}          a process → its own identity's probes: SessionClaim
                                    (retained while connected), SessionProbe

A worker's broker identity reads only `workers/{itself}/#` and writes only
`events/{itself}` and `presence/{itself}`, so the topic names the sender. An artifact's
topics name the workbench that submitted it (its owner): a workbench's ACL reads only its
own, and a reader that does not know the owner subscribes with `+` in its place. A node's
`sessions/{itself}` is read only by its own probe identity (transport/claims.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

PROTOCOL_VERSION = 1
ROOT = f"flotta/v{PROTOCOL_VERSION}"


class Channel(StrEnum):
    """What a topic carries; the key that decoding dispatches on."""

    SUBMIT = "submit"
    CANCEL = "cancel"
    ASK = "ask"  # a StatusRequest
    PRUNE = "prune"
    SCHEDULE = "schedule"
    REPLY = "reply"
    STATUS = "status"
    LOCKS = "locks"
    JOBS = "jobs"
    CONTROL = "control"
    EVENTS = "events"
    PRESENCE = "presence"
    SESSION = "session"


def submit(client: str) -> str:
    return f"{ROOT}/requests/{client}/submit"


def cancel(client: str) -> str:
    return f"{ROOT}/requests/{client}/cancel"


def ask(client: str) -> str:
    return f"{ROOT}/requests/{client}/status"


def prune(client: str) -> str:
    return f"{ROOT}/requests/{client}/prune"


def schedule(client: str) -> str:
    return f"{ROOT}/requests/{client}/schedule"


def reply(client: str) -> str:
    return f"{ROOT}/replies/{client}"


def status(owner: str, artifact_id: str) -> str:
    """An artifact's status topic; `owner` may be `+` to follow it without knowing it."""
    return f"{ROOT}/artifacts/{owner}/{artifact_id}/status"


def locks(owner: str, artifact_id: str) -> str:
    return f"{ROOT}/artifacts/{owner}/{artifact_id}/locks"


def jobs(worker: str) -> str:
    return f"{ROOT}/workers/{worker}/jobs"


def control(worker: str) -> str:
    return f"{ROOT}/workers/{worker}/control"


def events(worker: str) -> str:
    return f"{ROOT}/events/{worker}"


def presence(node: str) -> str:
    return f"{ROOT}/presence/{node}"


def session(client: str) -> str:
    """Where a process claims its broker identity (client id) while it is connected."""
    return f"{ROOT}/sessions/{client}"


# Subscription filters.
ALL_REQUESTS = f"{ROOT}/requests/+/+"
ALL_EVENTS = f"{ROOT}/events/+"
ALL_PRESENCE = f"{ROOT}/presence/+"
ALL_STATUS = f"{ROOT}/artifacts/+/+/status"


def worker_inbox(worker: str) -> str:
    """Everything addressed to one worker."""
    return f"{ROOT}/workers/{worker}/+"


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed topic: its channel and the node or artifact it names."""

    channel: Channel
    name: str  # the client, worker, node or artifact id the topic names


class TopicError(ValueError):
    """A topic outside the protocol."""


_TWO_LEVELS = {
    ("replies",): Channel.REPLY,
    ("events",): Channel.EVENTS,
    ("presence",): Channel.PRESENCE,
    ("sessions",): Channel.SESSION,
}
_THREE_LEVELS = {
    ("requests", "submit"): Channel.SUBMIT,
    ("requests", "cancel"): Channel.CANCEL,
    ("requests", "status"): Channel.ASK,
    ("requests", "prune"): Channel.PRUNE,
    ("requests", "schedule"): Channel.SCHEDULE,
    ("workers", "jobs"): Channel.JOBS,
    ("workers", "control"): Channel.CONTROL,
}
_FOUR_LEVELS = {("artifacts", "status"): Channel.STATUS, ("artifacts", "locks"): Channel.LOCKS}


def parse(topic: str) -> Address:
    """Split a topic into its channel and name, or raise TopicError saying why not."""
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"topic {topic!r} is not under {ROOT}/")
    levels = topic[len(prefix) :].split("/")
    if len(levels) == 2 and (levels[0],) in _TWO_LEVELS and levels[1]:
        return Address(_TWO_LEVELS[(levels[0],)], levels[1])
    if len(levels) == 3 and (levels[0], levels[2]) in _THREE_LEVELS and levels[1]:
        return Address(_THREE_LEVELS[(levels[0], levels[2])], levels[1])
    if len(levels) == 4 and (levels[0], levels[3]) in _FOUR_LEVELS and levels[1] and levels[2]:
        return Address(_FOUR_LEVELS[(levels[0], levels[3])], levels[2])
    raise TopicError(f"topic {topic!r} is not a topic of protocol v{PROTOCOL_VERSION}")
