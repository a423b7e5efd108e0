"""The scheduler's database in a SQLite file: the embedded default, one scheduler alone."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flotta_mqtt import sqlite
from flotta_mqtt.scheduler.repository import UNFINISHED, Params, Repository, Rows

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

# What the scheduler loses with its database: every artifact it held.
RECOVERY = (
    "move it aside (`sqlite3 FILE .recover` may save its rows) and start the scheduler "
    "again with a new one: the artifacts it held are forgotten, their last statuses stay "
    "retained on the broker"
)


class SqliteRepository(Repository):
    """SQLite in WAL mode.

    Each transaction first checks that the file is still where it was opened: one deleted
    or replaced meanwhile would lose at the scheduler's stop all that is written to it
    from then on, so it is a refused write.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = self.where = str(path)
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
        """The header's user_version, set to what it is, is written again."""
        with self.transaction():
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            self._db.execute(f"PRAGMA user_version = {int(version)}")

    def is_refusal(self, exc: BaseException) -> bool:
        return sqlite.is_refusal(exc)

    def _execute(self, sql: str, params: Params = ()) -> Rows:
        return self._db.execute(sql, params)

    def _executemany(self, sql: str, params: Iterable[Params]) -> None:
        self._db.executemany(sql, params)


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
                UNFINISHED,
            )


__all__ = ["SqliteRepository"]
