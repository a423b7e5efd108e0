"""The scheduler's durable truth: artifacts, jobs, locks, attempts and resources.

The only scheduler modules that touch a database are this interface and its two
implementations, SQLite (sqlite_repository, the embedded default) and PostgreSQL
(postgres_repository, for active/standby schedulers): the core decides the writes, the
service applies them here, one transaction per burst. The queries are written once, in
`?` placeholders and SQL both engines speak; an implementation runs them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

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

UNFINISHED = (ArtifactState.SUBMITTED, ArtifactState.RUNNING)  # every other state is final
# every table that holds artifacts' rows or schedules
TABLES = ("artifacts", "jobs", "locks", "nodes", "schedules")

Params = Sequence[Any]


class Rows(Protocol):
    """What a query returns, in either engine: tuples."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Repository(ABC):
    """The scheduler's database, written by the scheduler thread alone, one transaction
    per burst. `new` says it held nothing when opened (on PostgreSQL: when this process
    began to lead); `where` names it in logs (never with a password)."""

    new: bool
    where: str

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """All the writes of the block, or none: a refused one raises (see is_refusal)."""

    @abstractmethod
    def probe(self) -> None:
        """Commit a write that changes nothing: it fails as any commit would while
        writes are refused."""

    @abstractmethod
    def is_refusal(self, exc: BaseException) -> bool:
        """Whether a write failed for the database's sake (a disk full, a file moved, a
        server gone), which may mend, not for the data's (a bug)."""

    @abstractmethod
    def _execute(self, sql: str, params: Params = ()) -> Rows: ...

    @abstractmethod
    def _executemany(self, sql: str, params: Iterable[Params]) -> None: ...

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
                    self._execute("DELETE FROM schedules WHERE id = ?", (write.schedule_id,))

    # --- artifacts ---------------------------------------------------------------------

    def owners(self) -> dict[str, str]:
        """Every artifact ever submitted, and who submitted it: the core answers re-sent
        requests, and requests only from their owners, from it."""
        return dict(self._execute("SELECT id, client FROM artifacts").fetchall())

    def insert_artifact(self, artifact: Artifact, client: str, now: float) -> None:
        self._execute(
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
        self._execute(
            "UPDATE artifacts SET state = ?, seq = ?, error = ?, failed_job = ?, updated_at = ?, "
            "finished_at = COALESCE(finished_at, ?) WHERE id = ?",
            (state, seq, _json(error), failed_job, now, finished, artifact_id),
        )

    def bind_artifact(self, artifact_id: str, context: SchedulerContext, graph: JobGraph) -> None:
        """Record the context (binding is deterministic from it), every job and every lock."""
        self._execute(
            "UPDATE artifacts SET context = ? WHERE id = ?",
            (context.model_dump_json(), artifact_id),
        )
        self._executemany(
            "INSERT INTO jobs (artifact_id, job_id, worker, state, attempt) VALUES (?, ?, ?, ?, 0)",
            ((artifact_id, job.id, job.worker, JobState.WAITING) for job in graph.jobs),
        )
        self._executemany(
            "INSERT INTO locks (artifact_id, job_id, unlocks) VALUES (?, ?, ?)",
            ((artifact_id, a, b) for a, b in graph.graph.edges),
        )

    def unfinished_artifacts(self) -> list[str]:
        rows = self._execute(
            "SELECT id FROM artifacts WHERE state IN (?, ?) ORDER BY submitted_at", UNFINISHED
        ).fetchall()
        return [row[0] for row in rows]

    def finished_artifacts(self) -> dict[str, float]:
        """When each final artifact finished (wall clock), oldest first: what may be pruned."""
        rows = self._execute(
            "SELECT id, finished_at FROM artifacts WHERE state NOT IN (?, ?) ORDER BY finished_at",
            UNFINISHED,
        )
        return dict(rows.fetchall())

    def delete_artifact(self, artifact_id: str) -> None:
        """Remove a pruned artifact's rows from every table that holds any."""
        for delete in (
            "DELETE FROM locks WHERE artifact_id = ?",
            "DELETE FROM jobs WHERE artifact_id = ?",
            "DELETE FROM artifacts WHERE id = ?",
        ):
            self._execute(delete, (artifact_id,))

    def artifact(self, artifact_id: str) -> ArtifactRow | None:
        row = self._execute(
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
        self._execute(
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
        self._execute(
            "UPDATE jobs SET worker = ? WHERE artifact_id = ? AND job_id = ?",
            (worker, artifact_id, job_id),
        )

    def cancel_jobs(self, artifact_id: str) -> None:
        self._execute(
            "UPDATE jobs SET state = ? WHERE artifact_id = ? AND state NOT IN (?, ?, ?)",
            (
                JobState.CANCELLED,
                artifact_id,
                JobState.COMPLETED,
                JobState.FAILED,
                JobState.SKIPPED,
            ),
        )

    def jobs(self, artifact_id: str) -> list[JobRow]:
        rows = self._execute(
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
        self._execute(
            "INSERT INTO nodes (name, presence) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET presence = excluded.presence",
            (presence.node, presence.model_dump_json()),
        )

    def nodes(self) -> list[NodePresence]:
        rows = self._execute("SELECT presence FROM nodes ORDER BY name").fetchall()
        return [NodePresence.model_validate_json(row[0]) for row in rows]

    # --- schedules -----------------------------------------------------------------------

    def save_schedule(self, row: SaveSchedule) -> None:
        self._execute(
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
        rows = self._execute(
            "SELECT id, owner, cron, artifact, next_run, runs FROM schedules ORDER BY id"
        ).fetchall()
        return [
            SaveSchedule(r[0], r[1], r[2], Artifact.model_validate_json(r[3]), r[4], r[5])
            for r in rows
        ]


def _json(value: Resource | RemoteError | None) -> str | None:
    return None if value is None else value.model_dump_json()


__all__ = ["TABLES", "UNFINISHED", "Repository"]
