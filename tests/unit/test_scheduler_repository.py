"""The scheduler's repository: a status rebuilt from what it stored lists what the live one
listed, a database made by an earlier version opens with what it lacks added, and a
pruned artifact leaves no row in any table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    Collect,
    Finalize,
    JobState,
    NodeRef,
    Operation,
    Parallel,
    SchedulerContext,
    Step,
    bind,
)
from flotta_mqtt.protocol import Resource
from flotta_mqtt.scheduler.announcements import summaries
from flotta_mqtt.scheduler.records import restore
from flotta_mqtt.scheduler.repository import Repository


def bound_artifact(repository: Repository, *steps: Step) -> Artifact:
    artifact = Artifact(project="p", steps=list(steps) or [Parallel(Operation(name="noop"))])
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


def rows(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        tables = [
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return {
            table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in tables
        }


def test_a_database_of_an_earlier_version_gains_when_artifacts_finished(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    repository = Repository(path)
    done, running = bound_artifact(repository), bound_artifact(repository)
    with repository.transaction():
        repository.update_artifact(done.id, ArtifactState.COMPLETED, 1, 5.0)
        repository.update_artifact(done.id, ArtifactState.COMPLETED, 2, 9.0)  # announced again
        repository.update_artifact(running.id, ArtifactState.RUNNING, 1, 6.0)
    assert repository.finished_artifacts() == {done.id: 5.0}
    repository.close()
    with sqlite3.connect(path) as db:  # as an earlier version left it
        db.execute("ALTER TABLE artifacts DROP COLUMN finished_at")
    reopened = Repository(path)
    assert reopened.finished_artifacts() == {done.id: 9.0}  # its last change, the best guess
    reopened.close()


def test_a_deleted_artifact_leaves_no_row_in_any_table(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.db"
    repository = Repository(path)
    steps = (Parallel(Operation(name="noop"), Collect()), Finalize(Operation(name="noop")))
    gone, kept = bound_artifact(repository, *steps), bound_artifact(repository, *steps)
    before = rows(path)
    assert before == {"artifacts": 2, "jobs": 4, "locks": 2, "nodes": 0, "schedules": 0}
    with repository.transaction():
        repository.delete_artifact(gone.id)
    after = rows(path)
    assert set(after) == {"artifacts", "jobs", "locks", "nodes", "schedules"}
    assert after == {"artifacts": 1, "jobs": 2, "locks": 1, "nodes": 0, "schedules": 0}
    assert set(repository.owners()) == {kept.id}
    repository.close()
