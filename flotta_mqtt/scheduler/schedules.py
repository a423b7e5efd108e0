"""Scheduled runs: an owner's artifact submitted again at each time a cron expression
names (UTC), from the scheduler's tick.

Schedules live in the scheduler's database (its `schedules` table) and here. A run is a
submission by the schedule's owner, under an artifact id fixed by the schedule and the
minute it was due, and the schedule's next run is written in the same transaction as
the run's artifact. So a scheduler stopped at any moment and started again fires each
run once: never twice (its id would be taken, and a re-sent submission is answered, not
run again) and never not at all (neither write was made, so the run is still due).

Runs missed while the scheduler was down fire once each when it is back, oldest first,
as far back as CATCH_UP and no more than MAX_CATCH_UP runs of one schedule (the latest);
older ones are skipped, and logged.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from flotta_mqtt.model import Artifact, Registry
from flotta_mqtt.model.cron import Cron
from flotta_mqtt.protocol import topics
from flotta_mqtt.protocol.messages import RejectReason
from flotta_mqtt.protocol.schedules import (
    MAX_SCHEDULES,
    ScheduleAdd,
    ScheduleInfo,
    ScheduleList,
    ScheduleRemove,
    ScheduleReport,
)
from flotta_mqtt.scheduler.effects import Decision, DeleteSchedule, SaveSchedule
from flotta_mqtt.scheduler.intake import rejection

log = logging.getLogger(__name__)

CATCH_UP = 24 * 3600.0  # seconds: how far back missed runs are made up for
MAX_CATCH_UP = 100  # runs of one schedule made up for at most, the latest


def run_id(schedule_id: str, due: float) -> str:
    """The artifact id of a schedule's run due at `due`: its minute, in UTC."""
    return f"{schedule_id}-{datetime.fromtimestamp(due, UTC):%Y%m%d%H%M}"


@dataclass
class Schedule:
    id: str
    owner: str
    cron: Cron
    artifact: Artifact  # what each run submits, under its run id
    next_run: float
    runs: int

    def row(self) -> SaveSchedule:
        return SaveSchedule(
            self.id, self.owner, self.cron.text, self.artifact, self.next_run, self.runs
        )

    def info(self) -> ScheduleInfo:
        return ScheduleInfo(
            schedule_id=self.id,
            owner=self.owner,
            cron=self.cron.text,
            project=self.artifact.project,
            next_run=self.next_run,
            runs=self.runs,
        )


class Schedules:
    """Every schedule, by id; requests about them answered, and their runs fired."""

    def __init__(
        self, registry: Registry | None, elsewhere: Callable[[str], str | None] = lambda p: None
    ) -> None:
        self.registry = registry  # None: everyone may see and remove every schedule
        self.elsewhere = elsewhere  # why a project's runs are not this scheduler's to take
        self.by_id: dict[str, Schedule] = {}

    def restore(self, rows: Iterable[SaveSchedule]) -> None:
        self.by_id = {
            row.schedule_id: Schedule(
                row.schedule_id,
                row.owner,
                Cron.parse(row.cron),
                row.artifact,
                row.next_run,
                row.runs,
            )
            for row in rows
        }

    def handle(
        self,
        client: str,
        request: ScheduleAdd | ScheduleRemove | ScheduleList,
        wall: float,
        decision: Decision,
    ) -> None:
        """Answer `client`'s request on its reply topic, writing what it changes."""
        topic = topics.schedule(client)
        if isinstance(request, ScheduleList):
            shown = [s for s in self.by_id.values() if self._may_act(client, s.owner)]
            self._report(client, "list", shown, decision)
            return
        schedule = self.by_id.get(request.schedule_id)
        if isinstance(request, ScheduleRemove):
            if schedule is None or not self._may_act(client, schedule.owner):
                # Another owner's schedule is not this requester's to know of.
                error = f"no such schedule ID {request.schedule_id}"
                self._reject(topic, error, "unknown_schedule", decision)
                return
            del self.by_id[schedule.id]
            decision.writes.append(DeleteSchedule(schedule.id))
            self._report(client, "remove", [schedule], decision)
            return
        if schedule is not None:
            if schedule.owner == client:  # a re-sent request: answered, nothing changed
                self._report(client, "add", [schedule], decision)
            else:
                error = f"schedule ID {schedule.id} is taken: add it under another ID"
                self._reject(topic, error, "invalid", decision)
            return
        elsewhere = self.elsewhere(request.artifact.project)
        if elsewhere is not None:
            self._reject(topic, elsewhere, "other_group", decision)
            return
        owned = sum(s.owner == client for s in self.by_id.values())
        if owned >= MAX_SCHEDULES:
            error = f"{client} has {owned} schedules, the most one owner may have"
            self._reject(topic, error, "quota", decision)
            return
        cron = Cron.parse(request.cron)
        schedule = Schedule(
            request.schedule_id, client, cron, request.artifact, cron.next_after(wall), 0
        )
        self.by_id[schedule.id] = schedule
        decision.writes.append(schedule.row())
        self._report(client, "add", [schedule], decision)

    def fire(self, wall: float, decision: Decision) -> list[tuple[str, Artifact]]:
        """The runs due by `wall`, as (owner, artifact) to submit, oldest first; their
        schedules' next runs, written."""
        runs: list[tuple[float, str, Artifact]] = []
        for schedule in self.by_id.values():
            if schedule.next_run > wall:
                continue
            due = schedule.next_run
            if due < wall - CATCH_UP:
                due = schedule.cron.next_after(wall - CATCH_UP)
            times: deque[float] = deque(maxlen=MAX_CATCH_UP)
            while due <= wall:
                times.append(due)
                due = schedule.cron.next_after(due)
            if times and times[0] > schedule.next_run:
                log.warning(
                    "schedule %s: its runs due from %s to before %s are skipped (runs missed "
                    "are made up for %d h back at most, %d runs at most)",
                    schedule.id,
                    run_id(schedule.id, schedule.next_run),
                    run_id(schedule.id, times[0]),
                    CATCH_UP // 3600,
                    MAX_CATCH_UP,
                )
            for when in times:
                run = schedule.artifact.model_copy(update={"id": run_id(schedule.id, when)})
                runs.append((when, schedule.owner, run))
            schedule.next_run, schedule.runs = due, schedule.runs + len(times)
            decision.writes.append(schedule.row())
        return [(owner, artifact) for _, owner, artifact in sorted(runs, key=lambda r: r[0])]

    def _may_act(self, client: str, owner: str) -> bool:
        registry = self.registry
        return registry is None or client == owner or registry.is_admin(client)

    def _report(self, client: str, action: str, shown: list[Schedule], decision: Decision) -> None:
        listed = sorted(shown, key=lambda s: (s.owner, s.id))[:MAX_SCHEDULES]
        report = ScheduleReport.model_validate(
            {"action": action, "schedules": [s.info() for s in listed], "total": len(shown)}
        )
        decision.publish.append((topics.reply(client), report, False))

    @staticmethod
    def _reject(topic: str, error: str, reason: RejectReason, decision: Decision) -> None:
        answer = rejection(topic, error, None, reason)
        if answer is not None:
            decision.publish.append(answer)
