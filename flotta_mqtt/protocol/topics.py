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
  {DIRECTORY}/{project}             a scheduler → workbenches: DirectoryEntry, the group
                                    serving a project (retained; no group's namespace)

Scheduler groups: a group's topics are the same under `flotta/v1-{group}` (one level, so
ACL filters `flotta/+/...` still fit). A node spells protocol topics under ROOT; its bus
moves them into its group's namespace on the way out (`to_group`) and back on receipt
(`from_group`), so the parts need no change to run inside a group.

A worker's broker identity reads only `workers/{itself}/#` and writes only
`events/{itself}` and `presence/{itself}`, so the topic names the sender. An artifact's
topics name the workbench that submitted it (its owner): a workbench's ACL reads only its
own, and a reader that does not know the owner subscribes with `+` in its place. A node's
`sessions/{itself}` is read only by its own probe identity (transport/claims.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum

from flotta_mqtt.model.ids import GROUP

PROTOCOL_VERSION = 1
ROOT = f"flotta/v{PROTOCOL_VERSION}"
DIRECTORY = f"flotta/directory/v{PROTOCOL_VERSION}"  # outside every group's namespace


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
    DIRECTORY = "directory"


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


def directory(project: str) -> str:
    """Where the group serving a project is named: `+` for every project's entry."""
    return f"{DIRECTORY}/{project}"


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
    """A parsed topic: its channel, the node or artifact it names, and its group."""

    channel: Channel
    name: str  # the client, worker, node, artifact id or project the topic names
    group: str | None = None  # None: the default namespace (ROOT)


class TopicError(ValueError):
    """A topic outside the protocol."""


def check_group(group: str) -> str:
    """`group` if it can name a group, else ValueError saying why not."""
    if not GROUP.fullmatch(group):
        raise ValueError(
            f"group name {group!r} is not letters, digits, '.', '_', '-' (at most 64, "
            "starting with a letter or digit)"
        )
    return group


@functools.lru_cache(maxsize=256)  # called for every message a grouped bus sends or receives
def root(group: str | None) -> str:
    """The namespace of a group's topics (ROOT for the default group)."""
    return ROOT if group is None else f"{ROOT}-{check_group(group)}"


def to_group(topic: str, group: str | None) -> str:
    """A protocol topic or filter (under ROOT) moved into `group`'s namespace; any other
    topic (the directory, a topic already in some group) is left as it is."""
    if group is None or not (topic == ROOT or topic.startswith(ROOT + "/")):
        return topic
    return root(group) + topic[len(ROOT) :]


def from_group(topic: str, group: str | None) -> str:
    """A topic received in `group`'s namespace moved back under ROOT; any other topic is
    left as it is (decoding reads its namespace from it)."""
    if group is None:
        return topic
    namespace = root(group)
    if topic == namespace or topic.startswith(namespace + "/"):
        return ROOT + topic[len(namespace) :]
    return topic


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
    """Split a topic into its channel, name and group, or raise TopicError saying why not."""
    if topic.startswith(DIRECTORY + "/"):
        project = topic[len(DIRECTORY) + 1 :]
        if project and "/" not in project:
            return Address(Channel.DIRECTORY, project)
        raise TopicError(f"topic {topic!r} is not a directory entry: {DIRECTORY}/PROJECT")
    namespace = "/".join(topic.split("/", 2)[:2])
    group = namespace[len(ROOT) + 1 :] if namespace.startswith(ROOT + "-") else None
    if namespace != ROOT and (group is None or not GROUP.fullmatch(group)):
        raise TopicError(f"topic {topic!r} is not under {ROOT}/ or a group's {ROOT}-GROUP/")
    levels = topic[len(namespace) + 1 :].split("/")
    if len(levels) == 2 and (levels[0],) in _TWO_LEVELS and levels[1]:
        return Address(_TWO_LEVELS[(levels[0],)], levels[1], group)
    if len(levels) == 3 and (levels[0], levels[2]) in _THREE_LEVELS and levels[1]:
        return Address(_THREE_LEVELS[(levels[0], levels[2])], levels[1], group)
    if len(levels) == 4 and (levels[0], levels[3]) in _FOUR_LEVELS and levels[1] and levels[2]:
        return Address(_FOUR_LEVELS[(levels[0], levels[3])], levels[2], group)
    raise TopicError(f"topic {topic!r} is not a topic of protocol v{PROTOCOL_VERSION}")
