"""Scheduled runs on the bus: a workbench adds, lists or removes the schedules it owns on
requests/{client}/schedule; the scheduler answers on replies/{client} with a
ScheduleReport (or a RequestRejected)."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from flotta_mqtt.model import Artifact, SafeId
from flotta_mqtt.model.cron import MAX_LENGTH, Cron
from flotta_mqtt.protocol.messages import Message, Timestamp

# The most schedules one owner may have, and the most a report lists.
MAX_SCHEDULES = 100
# A run's artifact id is the schedule's, `-`, and the minute it was due (YYYYMMDDHHMM,
# UTC): the same for a run fired again after a restart, which is then refused as taken.
ScheduleId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]


def _cron(text: str) -> str:
    return Cron.parse(text).text


CronText = Annotated[str, Field(max_length=MAX_LENGTH), AfterValidator(_cron)]


class ScheduleAdd(Message):
    """Submit `artifact` at each time `cron` names (UTC), under an id of its own per run."""

    action: Literal["add"] = "add"
    schedule_id: ScheduleId = Field(default_factory=lambda: uuid.uuid4().hex)
    cron: CronText
    artifact: Artifact


class ScheduleRemove(Message):
    """Stop a schedule: no run of it starts from then on (runs started go on)."""

    action: Literal["remove"] = "remove"
    schedule_id: ScheduleId


class ScheduleList(Message):
    """The schedules the requester owns (every owner's, for an administrator)."""

    action: Literal["list"] = "list"


ScheduleRequest = Annotated[
    ScheduleAdd | ScheduleRemove | ScheduleList, Field(discriminator="action")
]


class ScheduleInfo(Message):
    """A schedule as its owner sees it."""

    schedule_id: ScheduleId
    owner: SafeId
    cron: str
    project: str
    next_run: Timestamp  # when it fires next (seconds since the epoch)
    runs: Annotated[int, Field(ge=0)]  # how many times it fired


class ScheduleReport(Message):
    """The answer to a ScheduleRequest: the schedule added or removed, or those listed
    (the first MAX_SCHEDULES of `total`)."""

    action: Literal["add", "remove", "list"]
    schedules: Annotated[list[ScheduleInfo], Field(max_length=MAX_SCHEDULES)]
    total: Annotated[int, Field(ge=0)]


__all__ = [
    "MAX_SCHEDULES",
    "ScheduleAdd",
    "ScheduleId",
    "ScheduleInfo",
    "ScheduleList",
    "ScheduleRemove",
    "ScheduleReport",
    "ScheduleRequest",
]
