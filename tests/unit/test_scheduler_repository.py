"""The scheduler's repository: a status rebuilt from what it stored lists what the live one
listed, a database made by an earlier version opens with what it lacks added, and a
pruned artifact leaves no row in any table. The behaviour is tested on both engines
(`opened`: SQLite and PostgreSQL); migrations are SQLite's alone."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

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
from flotta_mqtt.protocol import NodePresence, Resource
from flotta_mqtt.scheduler.announcements import summaries
from flotta_mqtt.scheduler.postgres_repository import PostgresRepository
from flotta_mqtt.scheduler.records import restore
from flotta_mqtt.scheduler.repository import Repository
from flotta_mqtt.scheduler.sqlite_repository import SqliteRepository
from flotta_mqtt.sqlite import StoreError

Opener = Callable[[], Repository]


@pytest.fixture(params=["sqlite", "postgres"])
def opened(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the test's database (the same each time) on each engine; closed after it."""
    made: list[Repository] = []
    if request.param == "sqlite":
        path = tmp_path / "scheduler.db"

        def sqlite_repository() -> Repository:
            made.append(SqliteRepository(path))
            return made[-1]

        yield sqlite_repository
    else:
        url = request.getfixturevalue("postgres_url")

        def postgres_repository() -> Repository:
            made.append(PostgresRepository(url, "scheduler"))
            return made[-1]

        yield postgres_repository
    for repository in made:
        repository.close()


def bound_artifact(repository: Repository, *steps: Step) -> Artifact:
    artifact = Artifact(project="p", steps=list(steps) or [Parallel(Operation(name="noop"))])
    context = SchedulerContext(initiator=NodeRef(id="s.initiator"), workers=[NodeRef(id="w0")])
    with repository.transaction():
        repository.insert_artifact(artifact, "wb", 1.0)
        repository.bind_artifact(artifact.id, context, bind(artifact, context))
    return artifact


def test_a_restored_listing_keeps_each_jobs_exit_code(opened: Opener) -> None:
    repository = opened()
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


def test_a_database_of_an_earlier_version_gains_the_exit_code_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    repository = SqliteRepository(path)
    artifact = bound_artifact(repository)
    repository.close()
    with sqlite3.connect(path) as db:  # as an earlier version left it
        db.execute("ALTER TABLE jobs DROP COLUMN exit_code")
    reopened = SqliteRepository(path)
    assert [job.exit_code for job in reopened.jobs(artifact.id)] == [None]
    with reopened.transaction():
        reopened.update_job(artifact.id, 0, JobState.FAILED, 1, exit_code=7)
    assert [job.exit_code for job in reopened.jobs(artifact.id)] == [7]
    reopened.close()


def rows(repository: Repository) -> dict[str, int]:
    """How many rows each table holds (but the PostgreSQL lease's)."""
    if isinstance(repository, SqliteRepository):
        with closing(sqlite3.connect(repository.path)) as db:
            listed = "SELECT name FROM sqlite_master WHERE type = 'table'"
            tables = [name for (name,) in db.execute(listed)]
            return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
    assert isinstance(repository, PostgresRepository)
    with psycopg.connect(repository.url) as pg:
        listed = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        tables = [str(name) for (name,) in pg.execute(listed).fetchall()]
        counts = {t: pg.execute(f"SELECT COUNT(*) FROM {t}").fetchone() for t in tables}
    return {t: int(row[0]) for t, row in counts.items() if row and t != "scheduler_leases"}


def test_a_database_of_an_earlier_version_gains_when_artifacts_finished(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    repository = SqliteRepository(path)
    done, running = bound_artifact(repository), bound_artifact(repository)
    with repository.transaction():
        repository.update_artifact(done.id, ArtifactState.COMPLETED, 1, 5.0)
        repository.update_artifact(done.id, ArtifactState.COMPLETED, 2, 9.0)  # announced again
        repository.update_artifact(running.id, ArtifactState.RUNNING, 1, 6.0)
    assert repository.finished_artifacts() == {done.id: 5.0}
    repository.close()
    with sqlite3.connect(path) as db:  # as an earlier version left it
        db.execute("ALTER TABLE artifacts DROP COLUMN finished_at")
    reopened = SqliteRepository(path)
    assert reopened.finished_artifacts() == {done.id: 9.0}  # its last change, the best guess
    reopened.close()


def test_a_deleted_artifact_leaves_no_row_in_any_table(opened: Opener) -> None:
    repository = opened()
    steps = (Parallel(Operation(name="noop"), Collect()), Finalize(Operation(name="noop")))
    gone, kept = bound_artifact(repository, *steps), bound_artifact(repository, *steps)
    before = rows(repository)
    assert before == {"artifacts": 2, "jobs": 4, "locks": 2, "nodes": 0, "schedules": 0}
    with repository.transaction():
        repository.delete_artifact(gone.id)
    after = rows(repository)
    assert after == {"artifacts": 1, "jobs": 2, "locks": 1, "nodes": 0, "schedules": 0}
    assert set(repository.owners()) == {kept.id}


def test_what_is_written_is_read_back_after_reopening(opened: Opener) -> None:
    """A restart's view: states, seqs, finish times, nodes and owners as written."""
    repository = opened()
    assert repository.new
    done, running = bound_artifact(repository), bound_artifact(repository)
    presence = NodePresence(node="w0", online=True, projects=["p"], since=1.0)
    with repository.transaction():
        repository.update_artifact(done.id, ArtifactState.COMPLETED, 1, 5.0)
        repository.update_artifact(done.id, ArtifactState.COMPLETED, 2, 9.0)  # announced again
        repository.update_artifact(running.id, ArtifactState.RUNNING, 1, 6.0)
        repository.update_job(running.id, 0, JobState.RUNNING, 2, started_at=7.0)
        repository.assign_job(running.id, 0, "w1")
        repository.save_node(presence)
        repository.save_node(presence.model_copy(update={"online": False}))
    reopened = opened()
    assert not reopened.new
    assert reopened.finished_artifacts() == {done.id: 5.0}
    assert reopened.unfinished_artifacts() == [running.id]
    assert reopened.owners() == {done.id: "wb", running.id: "wb"}
    row = reopened.artifact(running.id)
    assert row is not None and (row.state, row.seq, row.artifact) == (
        ArtifactState.RUNNING,
        1,
        running,
    )
    [job] = reopened.jobs(running.id)
    assert (job.state, job.attempt, job.worker, job.started_at) == (JobState.RUNNING, 2, "w1", 7.0)
    assert [(n.node, n.online) for n in reopened.nodes()] == [("w0", False)]
    with reopened.transaction():
        reopened.cancel_jobs(running.id)
    assert [job.state for job in reopened.jobs(running.id)] == [JobState.CANCELLED]


def test_a_write_that_fails_leaves_nothing_of_its_transaction(opened: Opener) -> None:
    repository = opened()
    artifact = bound_artifact(repository)
    with pytest.raises(ZeroDivisionError), repository.transaction():
        repository.update_artifact(artifact.id, ArtifactState.RUNNING, 1, 2.0)
        raise ZeroDivisionError
    row = repository.artifact(artifact.id)
    assert row is not None and (row.state, row.seq) == (ArtifactState.SUBMITTED, 0)


def test_a_postgresql_database_holding_other_tables_is_refused(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(StoreError, match=r"is not ours \(it holds tables invoices\)"):
        PostgresRepository(postgres_url, "scheduler")


def test_a_postgresql_table_of_our_name_with_other_columns_is_refused(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("CREATE TABLE jobs (id INTEGER)")
    with pytest.raises(StoreError, match="its table jobs has columns id"):
        PostgresRepository(postgres_url, "scheduler")


def test_an_unreachable_postgresql_is_one_line_naming_it_without_its_password() -> None:
    from postgres import free_port

    url = f"postgresql://u:secret@127.0.0.1:{free_port()}/db"
    with pytest.raises(StoreError, match="cannot connect to the scheduler database") as caught:
        PostgresRepository(url, "scheduler")
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)
