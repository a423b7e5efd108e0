"""The scheduler's repository: a status rebuilt from what it stored lists what the live one
listed, and a database made by an earlier version opens with what it lacks added."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flotta_mqtt.model import (
    Artifact,
    JobState,
    NodeRef,
    Operation,
    Parallel,
    SchedulerContext,
    bind,
)
from flotta_mqtt.protocol import Resource
from flotta_mqtt.scheduler.announcements import summaries
from flotta_mqtt.scheduler.records import restore
from flotta_mqtt.scheduler.repository import Repository


def bound_artifact(repository: Repository) -> Artifact:
    artifact = Artifact(project="p", steps=[Parallel(Operation(name="noop"))])
    context = SchedulerContext(initiator=NodeRef(id="s.initiator"), workers=[NodeRef(id="w0")])
    with repository.transaction():
        repository.insert_artifact(artifact, "wb", 1.0)
        repository.bind_artifact(artifact.id, context, bind(artifact, context))
    return artifact


def test_a_restored_listing_keeps_each_jobs_exit_code(tmp_path: Path) -> None:
    repository = Repository(tmp_path / "scheduler.db")
    artifact = bound_artifact(repository)
    product = Resource(url="data:,null", sha256="0" * 64, size=4)
    with repository.transaction():
        repository.update_job(
            artifact.id,
            0,
            JobState.COMPLETED,
            1,
            started_at=2.0,
            finished_at=3.0,
            product=product,
            exit_code=0,
        )
    row = repository.artifact(artifact.id)
    assert row is not None
    listed = summaries(restore(row, repository.jobs(artifact.id)))
    assert listed is not None
    assert [(job.exit_code, job.started_at, job.finished_at) for job in listed] == [(0, 2.0, 3.0)]
    repository.close()


def test_a_database_of_an_earlier_version_gains_the_exit_code_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    repository = Repository(path)
    artifact = bound_artifact(repository)
    repository.close()
    with sqlite3.connect(path) as db:  # as an earlier version left it
        db.execute("ALTER TABLE jobs DROP COLUMN exit_code")
    reopened = Repository(path)
    assert [job.exit_code for job in reopened.jobs(artifact.id)] == [None]
    with reopened.transaction():
        reopened.update_job(artifact.id, 0, JobState.FAILED, 1, exit_code=7)
    assert [job.exit_code for job in reopened.jobs(artifact.id)] == [7]
    reopened.close()
