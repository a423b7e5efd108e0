"""A worker's memory across restarts: the jobs it holds, the results not yet acknowledged,
the privacy it has spent (its ledger, never forgotten) and the workflow task runs it may
reuse (its task cache, workflows/caching.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter

from flotta_mqtt import sqlite
from flotta_mqtt.protocol import JobFailed, JobFinished, JobReady, JobRef

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    artifact_id TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    job TEXT NOT NULL,
    final TEXT,
    PRIMARY KEY (artifact_id, job_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS privacy_spent (
    project TEXT NOT NULL,
    artifact_id TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    at REAL NOT NULL,
    product BLOB,  -- what this attempt released: the same bytes if it runs again
    PRIMARY KEY (artifact_id, job_id, attempt)
);
CREATE INDEX IF NOT EXISTS privacy_spent_project ON privacy_spent (project);
CREATE TABLE IF NOT EXISTS task_cache (  -- rowid: the order entries were written in
    key TEXT PRIMARY KEY,  -- sha256 of tenant, task definition and inputs' sha256s
    entry TEXT NOT NULL,  -- the run reused: its artifact, job and outputs with sha256s
    at REAL NOT NULL
);
"""
# The most task runs the task cache remembers (the latest); a run forgotten runs again.
MAX_CACHED = 10_000
# Floating-point slack when a budget is spent to its last part (e.g. ten jobs of 0.1).
SLACK = 1e-9

# Losing the journal costs re-runs, never results: the scheduler sends a worker coming
# online again every job it gave it and has no result of.
RECOVERY = (
    "move it aside and start the worker again with a new one: the scheduler sends it again "
    "the jobs it gave it, and those that ran are run again"
)

Final = JobFinished | JobFailed
_FINAL: TypeAdapter[Final] = TypeAdapter(Final)


@dataclass
class Changes:
    """What one look of the agent changes: jobs taken, results the scheduler recorded
    and attempts it cancelled (forgotten), results published (kept until then), written
    in that order."""

    hold: list[JobReady] = field(default_factory=list)
    forget: list[JobRef] = field(default_factory=list)
    finish: list[Final] = field(default_factory=list)


@dataclass
class Held:
    job: JobReady
    final: Final | None


class Journal:
    """SQLite next to the worker (or in memory when it has no state directory).

    A job is written here before it runs and its result once published, so a restarted
    worker runs again the jobs it held and re-sends the results not yet acknowledged.
    Jobs and results are written by the agent thread alone; the privacy ledger by the
    runners, each spend in a transaction of its own; the lock orders them all.
    """

    def __init__(self, directory: Path | None) -> None:
        self.durable = directory is not None  # whether it outlives the process
        if directory is None:
            self.path = ":memory:"
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.path = str(directory / "journal.db")
        self._db = sqlite.open_store(self.path, SCHEMA, "worker journal", RECOVERY)
        self._lock = threading.RLock()  # taken by a transaction and by the writes in it
        # The attempts that paid for a release: only they are looked up or kept, so a job
        # that spends no privacy budget never touches the ledger (it runs on the hot path).
        self._paid: set[tuple[str, int, int]] = {
            (row[0], row[1], row[2])
            for row in self._db.execute("SELECT artifact_id, job_id, attempt FROM privacy_spent")
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Make the writes inside one transaction: the agent commits once per burst."""
        with self._lock, sqlite.transaction(self._db):
            yield

    def write(self, changes: list[Changes]) -> None:
        """Write `changes` in their order, in one transaction: all of them or none."""
        with self.transaction():
            for change in changes:
                for job in change.hold:
                    self.hold(job)
                if change.forget:
                    self.forget(change.forget)
                for final in change.finish:
                    self.finish(final)

    def hold(self, job: JobReady) -> None:
        """Remember a new attempt of a job (replacing an older attempt of it)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO jobs (artifact_id, job_id, attempt, job) "
                "VALUES (?, ?, ?, ?)",
                (job.artifact_id, job.job_id, job.attempt, job.model_dump_json()),
            )

    def finish(self, event: Final) -> None:
        ref = event.job
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET final = ? WHERE artifact_id = ? AND job_id = ? AND attempt = ?",
                (event.model_dump_json(), ref.artifact_id, ref.job_id, ref.attempt),
            )

    def forget(self, refs: list[JobRef]) -> None:
        """The scheduler has recorded these results, or cancelled these attempts: nothing
        about them is needed any more."""
        with self._lock:
            self._db.executemany(
                "DELETE FROM jobs WHERE artifact_id = ? AND job_id = ? AND attempt = ?",
                ((r.artifact_id, r.job_id, r.attempt) for r in refs),
            )

    def held(self) -> list[Held]:
        with self._lock:
            rows = self._db.execute("SELECT job, final FROM jobs").fetchall()
        return [
            Held(
                job=JobReady.model_validate_json(job),
                final=None if final is None else _FINAL.validate_json(final),
            )
            for job, final in rows
        ]

    # --- the privacy ledger -------------------------------------------------------------

    def spend(
        self, job: JobRef, project: str, epsilon: float, delta: float, limits: tuple[float, float]
    ) -> tuple[float, float] | None:
        """Record what `job` spends of `project`'s budget `limits` (epsilon, delta), once
        per attempt: None when recorded (or already), else what is left (nothing spent)."""
        key = (job.artifact_id, job.job_id, job.attempt)
        with self._lock, sqlite.transaction(self._db, "BEGIN IMMEDIATE"):
            paid = self._db.execute(
                "SELECT 1 FROM privacy_spent WHERE artifact_id = ? AND job_id = ? AND attempt = ?",
                key,
            ).fetchone()
            if paid is not None:
                return None
            spent_epsilon, spent_delta = self.spent(project)
            left = (limits[0] - spent_epsilon, limits[1] - spent_delta)
            if epsilon > left[0] + SLACK or delta > left[1] + SLACK * limits[1]:
                return max(left[0], 0.0), max(left[1], 0.0)
            self._db.execute(
                "INSERT INTO privacy_spent (project, artifact_id, job_id, attempt, epsilon, "
                "delta, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (project, *key, epsilon, delta, time.time()),
            )
        self._paid.add(key)
        return None

    def spent(self, project: str) -> tuple[float, float]:
        """The epsilon and delta spent of `project`'s budget so far."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0) FROM privacy_spent "
                "WHERE project = ?",
                (project,),
            ).fetchone()
        return float(row[0]), float(row[1])

    def keep(self, job: JobRef, product: bytes) -> None:
        """Keep what a paid-for attempt releases, before it leaves (a no-op if unpaid)."""
        if (job.artifact_id, job.job_id, job.attempt) not in self._paid:
            return
        with self._lock, sqlite.transaction(self._db):
            self._db.execute(
                "UPDATE privacy_spent SET product = ? "
                "WHERE artifact_id = ? AND job_id = ? AND attempt = ?",
                (product, job.artifact_id, job.job_id, job.attempt),
            )

    def released(self, job: JobRef) -> bytes | None:
        """What a paid-for attempt released already, if it runs again."""
        if (job.artifact_id, job.job_id, job.attempt) not in self._paid:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT product FROM privacy_spent "
                "WHERE artifact_id = ? AND job_id = ? AND attempt = ?",
                (job.artifact_id, job.job_id, job.attempt),
            ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    # --- the task cache -----------------------------------------------------------------

    def cached(self, key: str) -> str | None:
        """The entry of a cached task run, by its key."""
        with self._lock:
            row = self._db.execute("SELECT entry FROM task_cache WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def remember(self, key: str, entry: str) -> None:
        """Record (or replace) the entry of a task run that succeeded; the oldest entries
        beyond MAX_CACHED go."""
        with self._lock, sqlite.transaction(self._db):
            self._db.execute(
                "INSERT OR REPLACE INTO task_cache (key, entry, at) VALUES (?, ?, ?)",
                (key, entry, time.time()),
            )
            self._db.execute(
                "DELETE FROM task_cache WHERE key IN "
                "(SELECT key FROM task_cache ORDER BY rowid DESC LIMIT -1 OFFSET ?)",
                (MAX_CACHED,),
            )

    def drop(self, key: str) -> None:
        """Forget an entry whose outputs can no longer be reused."""
        with self._lock:
            self._db.execute("DELETE FROM task_cache WHERE key = ?", (key,))
