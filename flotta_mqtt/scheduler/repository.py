"""The scheduler's durable truth: artifacts, jobs, locks, attempts and resources in SQLite.

The only scheduler module that touches the database: the core decides the writes, the
service applies them here, one transaction per burst.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flotta_mqtt import sqlite
from flotta_mqtt.model import (
    ARTIFACT_FINAL,
    Artifact,
    ArtifactState,
    JobGraph,
    JobState,
    SchedulerContext,
)
from flotta_mqtt.protocol import NodePresence, RemoteError, Resource
from flotta_mqtt.scheduler.effects import (
    AssignJob,
    BindArtifact,
    CancelJobs,
    DeleteArtifact,
    DeleteSchedule,
    InsertArtifact,
    SaveNode,
    SaveSchedule,
    UpdateArtifact,
    UpdateJob,
    Write,
)
from flotta_mqtt.scheduler.gc_pause import gc_paused
from flotta_mqtt.scheduler.records import ArtifactRow, JobRow

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    body TEXT NOT NULL,
    context TEXT,
    state TEXT NOT NULL,
    seq INTEGER NOT NULL,
    error TEXT,
    failed_job INTEGER,
    submitted_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    artifact_id TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    worker TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started_at REAL,
    finished_at REAL,
    product TEXT,
    error TEXT,
    exit_code INTEGER,
    PRIMARY KEY (artifact_id, job_id)
) WITHOUT ROWID;
-- The DAG as bound; which locks are released follows from the states of the jobs.
CREATE TABLE IF NOT EXISTS locks (
    artifact_id TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    unlocks INTEGER NOT NULL,
    PRIMARY KEY (artifact_id, job_id, unlocks)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    presence TEXT NOT NULL
);
-- Scheduled runs (scheduler/schedules.py): what each submits, when it fires next.
CREATE TABLE IF NOT EXISTS schedules (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    cron TEXT NOT NULL,
    artifact TEXT NOT NULL,
    next_run REAL NOT NULL,
    runs INTEGER NOT NULL
);
"""
_UNFINISHED = (ArtifactState.SUBMITTED, ArtifactState.RUNNING)  # every other state is final


# What the scheduler loses with its database: every artifact it held.
RECOVERY = (
    "move it aside (`sqlite3 FILE .recover` may save its rows) and start the scheduler "
    "again with a new one: the artifacts it held are forgotten, their last statuses stay "
    "retained on the broker"
)


class Repository:
    """SQLite in WAL mode, written by the scheduler thread alone, one transaction per burst.

    `new` says it held nothing when opened. Each transaction first checks that the file
    is still where it was opened: one deleted or replaced meanwhile would lose at the
    scheduler's stop all that is written to it from then on, so it is a refused write.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._db = sqlite.open_store(self.path, SCHEMA, "scheduler database", RECOVERY, _migrate)
        self.new = sqlite.is_new(self._db)
        self._file = sqlite.file_of(self.path)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        sqlite.check_in_place(self.path, self._file)
        with sqlite.transaction(self._db, "BEGIN IMMEDIATE"):
            yield

    def probe(self) -> None:
        """Commit a write that changes nothing (the header's user_version, set to what it
        is, is written again): it fails as any commit would while writes are refused."""
        with self.transaction():
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            self._db.execute(f"PRAGMA user_version = {int(version)}")

    def apply(self, writes: list[Write]) -> None:
        """Write what the core decided, in its order (inside the caller's transaction)."""
        for write in writes:
            match write:
                case UpdateJob():
                    self.update_job(
                        write.artifact_id,
                        write.job_id,
                        write.state,
                        write.attempt,
                        started_at=write.started_at,
                        finished_at=write.finished_at,
                        product=write.product,
                        error=write.error,
                        exit_code=write.exit_code,
                    )
                case UpdateArtifact():
                    self.update_artifact(
                        write.artifact_id,
                        write.state,
                        write.seq,
                        write.now,
                        write.error,
                        write.failed_job,
                    )
                case InsertArtifact():
                    self.insert_artifact(write.artifact, write.client, write.now)
                case BindArtifact():
                    with gc_paused():
                        self.bind_artifact(write.artifact_id, write.context, write.graph)
                case AssignJob():
                    self.assign_job(write.artifact_id, write.job_id, write.worker)
                case CancelJobs():
                    self.cancel_jobs(write.artifact_id)
                case SaveNode():
                    self.save_node(write.presence)
                case DeleteArtifact():
                    self.delete_artifact(write.artifact_id)
                case SaveSchedule():
                    self.save_schedule(write)
                case DeleteSchedule():
                    self._db.execute("DELETE FROM schedules WHERE id = ?", (write.schedule_id,))

    # --- artifacts ---------------------------------------------------------------------

    def owners(self) -> dict[str, str]:
        """Every artifact ever submitted, and who submitted it: the core answers re-sent
        requests, and requests only from their owners, from it."""
        return dict(self._db.execute("SELECT id, client FROM artifacts").fetchall())

    def insert_artifact(self, artifact: Artifact, client: str, now: float) -> None:
        self._db.execute(
            "INSERT INTO artifacts (id, client, body, state, seq, submitted_at, updated_at) "
            "VALUES (?, ?, ?, ?, 0, ?, ?)",
            (artifact.id, client, artifact.model_dump_json(), ArtifactState.SUBMITTED, now, now),
        )

    def update_artifact(
        self,
        artifact_id: str,
        state: ArtifactState,
        seq: int,
        now: float,
        error: RemoteError | None = None,
        failed_job: int | None = None,
    ) -> None:
        """Record its state; a final one's first time is when it finished (re-announcing
        it later changes only `updated_at`)."""
        finished = now if state in ARTIFACT_FINAL else None
        self._db.execute(
            "UPDATE artifacts SET state = ?, seq = ?, error = ?, failed_job = ?, updated_at = ?, "
            "finished_at = COALESCE(finished_at, ?) WHERE id = ?",
            (state, seq, _json(error), failed_job, now, finished, artifact_id),
        )

    def bind_artifact(self, artifact_id: str, context: SchedulerContext, graph: JobGraph) -> None:
        """Record the context (binding is deterministic from it), every job and every lock."""
        self._db.execute(
            "UPDATE artifacts SET context = ? WHERE id = ?",
            (context.model_dump_json(), artifact_id),
        )
        self._db.executemany(
            "INSERT INTO jobs (artifact_id, job_id, worker, state, attempt) VALUES (?, ?, ?, ?, 0)",
            ((artifact_id, job.id, job.worker, JobState.WAITING) for job in graph.jobs),
        )
        self._db.executemany(
            "INSERT INTO locks (artifact_id, job_id, unlocks) VALUES (?, ?, ?)",
            ((artifact_id, a, b) for a, b in graph.graph.edges),
        )

    def unfinished_artifacts(self) -> list[str]:
        rows = self._db.execute(
            "SELECT id FROM artifacts WHERE state IN (?, ?) ORDER BY submitted_at", _UNFINISHED
        ).fetchall()
        return [row[0] for row in rows]

    def finished_artifacts(self) -> dict[str, float]:
        """When each final artifact finished (wall clock), oldest first: what may be pruned."""
        rows = self._db.execute(
            "SELECT id, finished_at FROM artifacts WHERE state NOT IN (?, ?) ORDER BY finished_at",
            _UNFINISHED,
        )
        return dict(rows.fetchall())

    def delete_artifact(self, artifact_id: str) -> None:
        """Remove a pruned artifact's rows from every table that holds any."""
        for delete in (
            "DELETE FROM locks WHERE artifact_id = ?",
            "DELETE FROM jobs WHERE artifact_id = ?",
            "DELETE FROM artifacts WHERE id = ?",
        ):
            self._db.execute(delete, (artifact_id,))

    def artifact(self, artifact_id: str) -> ArtifactRow | None:
        row = self._db.execute(
            "SELECT body, client, context, state, seq, error, failed_job, submitted_at "
            "FROM artifacts WHERE id = ?",
            (artifact_id,),
        ).fetchone()
        if row is None:
            return None
        body, client, context, state, seq, error, failed_job, submitted_at = row
        return ArtifactRow(
            artifact=Artifact.model_validate_json(body),
            client=client,
            context=None if context is None else SchedulerContext.model_validate_json(context),
            state=ArtifactState(state),
            seq=seq,
            error=None if error is None else RemoteError.model_validate_json(error),
            failed_job=failed_job,
            submitted_at=submitted_at,
        )

    # --- jobs and locks ------------------------------------------------------------------

    def update_job(
        self,
        artifact_id: str,
        job_id: int,
        state: JobState,
        attempt: int,
        *,
        started_at: float | None = None,
        finished_at: float | None = None,
        product: Resource | None = None,
        error: RemoteError | None = None,
        exit_code: int | None = None,
    ) -> None:
        self._db.execute(
            "UPDATE jobs SET state = ?, attempt = ?, started_at = COALESCE(?, started_at), "
            "finished_at = COALESCE(?, finished_at), product = COALESCE(?, product), "
            "error = COALESCE(?, error), exit_code = COALESCE(?, exit_code) "
            "WHERE artifact_id = ? AND job_id = ?",
            (
                state,
                attempt,
                started_at,
                finished_at,
                _json(product),
                _json(error),
                exit_code,
                artifact_id,
                job_id,
            ),
        )

    def assign_job(self, artifact_id: str, job_id: int, worker: str) -> None:
        """Record that a task moved to another worker."""
        self._db.execute(
            "UPDATE jobs SET worker = ? WHERE artifact_id = ? AND job_id = ?",
            (worker, artifact_id, job_id),
        )

    def cancel_jobs(self, artifact_id: str) -> None:
        self._db.execute(
            "UPDATE jobs SET state = ? WHERE artifact_id = ? AND state NOT IN (?, ?)",
            (JobState.CANCELLED, artifact_id, JobState.COMPLETED, JobState.FAILED),
        )

    def jobs(self, artifact_id: str) -> list[JobRow]:
        rows = self._db.execute(
            "SELECT job_id, worker, state, attempt, started_at, finished_at, product, error, "
            "exit_code FROM jobs WHERE artifact_id = ? ORDER BY job_id",
            (artifact_id,),
        ).fetchall()
        return [
            JobRow(
                job_id=row[0],
                worker=row[1],
                state=JobState(row[2]),
                attempt=row[3],
                started_at=row[4],
                finished_at=row[5],
                product=None if row[6] is None else Resource.model_validate_json(row[6]),
                error=None if row[7] is None else RemoteError.model_validate_json(row[7]),
                exit_code=row[8],
            )
            for row in rows
        ]

    # --- nodes ---------------------------------------------------------------------------

    def save_node(self, presence: NodePresence) -> None:
        self._db.execute(
            "INSERT INTO nodes (name, presence) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET presence = excluded.presence",
            (presence.node, presence.model_dump_json()),
        )

    def nodes(self) -> list[NodePresence]:
        rows = self._db.execute("SELECT presence FROM nodes ORDER BY name").fetchall()
        return [NodePresence.model_validate_json(row[0]) for row in rows]

    # --- schedules -----------------------------------------------------------------------

    def save_schedule(self, row: SaveSchedule) -> None:
        self._db.execute(
            "INSERT INTO schedules (id, owner, cron, artifact, next_run, runs) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "next_run = excluded.next_run, runs = excluded.runs",
            (
                row.schedule_id,
                row.owner,
                row.cron,
                row.artifact.model_dump_json(),
                row.next_run,
                row.runs,
            ),
        )

    def schedules(self) -> list[SaveSchedule]:
        rows = self._db.execute(
            "SELECT id, owner, cron, artifact, next_run, runs FROM schedules ORDER BY id"
        ).fetchall()
        return [
            SaveSchedule(r[0], r[1], r[2], Artifact.model_validate_json(r[3]), r[4], r[5])
            for r in rows
        ]


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database of an earlier version up to SCHEMA."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "exit_code" not in columns:  # a database made before jobs kept their exit code
        db.execute("ALTER TABLE jobs ADD COLUMN exit_code INTEGER")
    columns = {row[1] for row in db.execute("PRAGMA table_info(artifacts)")}
    if "finished_at" not in columns:  # made before artifacts kept when they finished
        with sqlite.transaction(db, "BEGIN IMMEDIATE"):
            db.execute("ALTER TABLE artifacts ADD COLUMN finished_at REAL")
            db.execute(  # its last change is the best guess there is
                "UPDATE artifacts SET finished_at = updated_at WHERE state NOT IN (?, ?)",
                _UNFINISHED,
            )


def _json(value: Resource | RemoteError | None) -> str | None:
    return None if value is None else value.model_dump_json()


__all__ = ["Repository"]
