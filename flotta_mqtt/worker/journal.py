"""A worker's memory across restarts: the jobs it holds and the results not yet acknowledged."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
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
"""

Final = JobFinished | JobFailed
_FINAL: TypeAdapter[Final] = TypeAdapter(Final)


@dataclass
class Held:
    job: JobReady
    final: Final | None


class Journal:
    """SQLite next to the worker (or in memory when it has no state directory).

    A job is written here before it runs and its result once published, so a restarted
    worker runs again the jobs it held and re-sends the results not yet acknowledged.
    Written by the agent thread alone; the lock lets other threads read it.
    """

    def __init__(self, directory: Path | None) -> None:
        if directory is None:
            path = ":memory:"
        else:
            directory.mkdir(parents=True, exist_ok=True)
            path = str(directory / "journal.db")
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()  # taken by a transaction and by the writes in it

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Make the writes inside one transaction: the agent commits once per burst."""
        with self._lock, sqlite.transaction(self._db):
            yield

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
