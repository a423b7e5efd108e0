"""Scheduled runs in the scheduler's core, against its repository on disk: a crash between
firing a run and committing it loses nothing, a restart after the commit fires nothing
again, and a stale schedule row is held back by the run's id; runs missed long ago are
made up for within their bounds."""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flotta_mqtt.model import Artifact, Tasks
from flotta_mqtt.protocol import RequestRejected, encode, topics
from flotta_mqtt.protocol.schedules import MAX_SCHEDULES, ScheduleAdd, ScheduleReport
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.scheduler.core import Policies, SchedulerCore
from flotta_mqtt.scheduler.effects import Clock, Decision, InsertArtifact, Received, Tick
from flotta_mqtt.scheduler.metrics import SchedulerMetrics
from flotta_mqtt.scheduler.repository import Repository
from flotta_mqtt.scheduler.schedules import CATCH_UP, MAX_CATCH_UP, run_id
from flotta_mqtt.scheduler.service import commit
from flotta_mqtt.scheduler.sqlite_repository import SqliteRepository

NOON = datetime(2026, 12, 3, 12, 0, 30, tzinfo=UTC).timestamp()
ARTIFACT = Artifact.model_validate(
    {"project": "p", "steps": [Tasks(tasks=[{"name": "t", "params": {"shell": "true"}}])]}
)


def restored(repository: Repository, wall: float) -> SchedulerCore:
    """A core as a scheduler (re)started on `repository` makes it."""
    config = SchedulerConfig(name="sched", database=Path(":memory:"))
    core = SchedulerCore(config, SchedulerMetrics(), Policies.of(config, random.Random(1)))
    core.schedules.restore(repository.schedules())
    clock = Clock(0.0, wall, 0.0)
    core.restore(
        repository.nodes(), repository.owners(), repository.finished_artifacts(), [], clock
    )
    return core


def tick(core: SchedulerCore, wall: float) -> Decision:
    return core.handle([Tick()], Clock(1.0, wall, 1.0))


def fired(decision: Decision) -> list[str]:
    return [w.artifact.id for w in decision.writes if isinstance(w, InsertArtifact)]


@pytest.fixture
def repository(tmp_path: Path) -> Repository:
    repository = SqliteRepository(tmp_path / "scheduler.db")
    core = restored(repository, NOON)
    add = ScheduleAdd(schedule_id="nightly", cron="* * * * *", artifact=ARTIFACT)
    received = Received(topics.schedule("alice"), encode(add), 0.0)
    decision = core.handle([received], Clock(0.0, NOON, 0.0))
    commit(repository, decision)
    (answer,) = [m for _, m, _ in decision.publish if isinstance(m, ScheduleReport)]
    assert answer.schedules[0].next_run == NOON + 30
    return repository


def test_a_run_lost_in_a_crash_fires_again_and_a_committed_one_never(
    repository: Repository,
) -> None:
    wall = NOON + 90  # 12:02:00: the 12:01 and 12:02 runs are due
    due = [run_id("nightly", NOON + 30), run_id("nightly", NOON + 90)]
    assert due == ["nightly-202612031201", "nightly-202612031202"]
    assert fired(tick(restored(repository, wall), wall)) == due  # then a crash: no commit
    core = restored(repository, wall)
    decision = tick(core, wall)
    assert fired(decision) == due
    commit(repository, decision)
    assert fired(tick(core, wall)) == []
    assert fired(tick(restored(repository, wall), wall)) == []
    # A schedule row behind its runs (a database restored from a backup, say): the runs'
    # ids are taken, so they are answered as re-sent submissions, not run again.
    repository._db.execute("UPDATE schedules SET next_run = ?, runs = 0", (NOON + 30,))
    assert fired(tick(restored(repository, wall), wall)) == []


def test_runs_missed_long_ago_are_made_up_for_within_bounds(
    repository: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    wall = NOON + 3 * 24 * 3600  # three days later, 30 s past the minute
    with caplog.at_level(logging.WARNING):
        runs = fired(tick(restored(repository, wall), wall))
    latest = wall - 30
    assert runs == [run_id("nightly", latest - 60 * i) for i in reversed(range(MAX_CATCH_UP))]
    assert MAX_CATCH_UP * 60 < CATCH_UP
    assert "schedule nightly: its runs due from nightly-202612031201 to before" in caplog.text


def test_an_owner_has_a_bounded_number_of_schedules(repository: Repository) -> None:
    core = restored(repository, NOON)

    def add(owner: str, schedule_id: str) -> object:
        request = ScheduleAdd(schedule_id=schedule_id, cron="0 0 * * *", artifact=ARTIFACT)
        received = Received(topics.schedule(owner), encode(request), 0.0)
        decision = core.handle([received], Clock(0.0, NOON, 0.0))
        ((_, answer, _),) = decision.publish
        return answer

    for i in range(MAX_SCHEDULES - 1):  # alice has `nightly` already
        assert isinstance(add("alice", f"s{i}"), ScheduleReport)
    refused = add("alice", "one-more")
    assert isinstance(refused, RequestRejected) and refused.reason == "quota"
    assert refused.error == f"alice has {MAX_SCHEDULES} schedules, the most one owner may have"
    assert isinstance(add("bob", "one-more"), ScheduleReport), "another owner's are counted apart"


def test_a_schedule_of_a_project_served_elsewhere_is_refused_when_added() -> None:
    config = SchedulerConfig(name="sched", database=Path(":memory:"), projects=["other"])
    core = SchedulerCore(config, SchedulerMetrics(), Policies.of(config, random.Random(1)))
    request = ScheduleAdd(schedule_id="nightly", cron="0 0 * * *", artifact=ARTIFACT)
    received = Received(topics.schedule("alice"), encode(request), 0.0)
    decision = core.handle([received], Clock(0.0, NOON, 0.0))
    ((_, refused, _),) = decision.publish
    assert isinstance(refused, RequestRejected) and refused.reason == "other_group"
    assert "project p is not served by the default group" in refused.error
    assert decision.writes == [] and core.schedules.by_id == {}
