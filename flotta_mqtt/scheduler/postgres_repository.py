"""The scheduler's database on a PostgreSQL server: what lets schedulers stand by for one
another (see lease.py), the server and its disks operated apart from them.

The database (its current schema) is the scheduler's own: one holding other tables, or
tables of ours with other columns, is refused when opened, as a foreign SQLite file is.
A connection lost is a refused write, as a full disk is for SQLite: the service pauses,
and the next transaction connects again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import psycopg

from flotta_mqtt.scheduler.lease import LeaseLost, connect, lease_key, redacted
from flotta_mqtt.scheduler.repository import TABLES, Params, Repository, Rows
from flotta_mqtt.sqlite import StoreError

SCHEMA = {
    "artifacts": """
        id TEXT PRIMARY KEY,
        client TEXT NOT NULL,
        body TEXT NOT NULL,
        context TEXT,
        state TEXT NOT NULL,
        seq INTEGER NOT NULL,
        error TEXT,
        failed_job INTEGER,
        submitted_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION""",
    "jobs": """
        artifact_id TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        worker TEXT NOT NULL,
        state TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        product TEXT,
        error TEXT,
        exit_code INTEGER,
        PRIMARY KEY (artifact_id, job_id)""",
    "locks": """
        artifact_id TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        unlocks INTEGER NOT NULL,
        PRIMARY KEY (artifact_id, job_id, unlocks)""",
    "nodes": """
        name TEXT PRIMARY KEY,
        presence TEXT NOT NULL""",
    # Scheduled runs (scheduler/schedules.py): what each submits, when it fires next.
    "schedules": """
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        cron TEXT NOT NULL,
        artifact TEXT NOT NULL,
        next_run DOUBLE PRECISION NOT NULL,
        runs INTEGER NOT NULL""",
    # Each scheduler's lease epoch, its fencing token (see lease.py).
    "scheduler_leases": """
        name TEXT PRIMARY KEY,
        epoch BIGINT NOT NULL""",
}
_SCHEMA_KEY = lease_key("flotta_mqtt schema")  # two schedulers starting make it once
_COLUMNS = (
    "SELECT table_name, column_name FROM information_schema.columns "
    "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
)


class PostgresRepository(Repository):
    """The database at `url` (postgresql://USER[:PASSWORD]@HOST[:PORT]/DB). Once
    `fence(epoch)` is called, each transaction first checks that this process still holds
    the lease of that epoch and raises LeaseLost, writing nothing, if not."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.where = redacted(url)
        self._epoch: int | None = None
        try:
            self._db = connect(url)
        except psycopg.OperationalError as exc:
            raise StoreError(
                f"cannot connect to the scheduler database {self.where}: "
                f"{' '.join(str(exc).split())}; check that the server runs and the URL"
            ) from exc
        try:
            self._make_schema()
            self.new = self._empty()
        except BaseException:
            self._db.close()
            raise

    def _empty(self) -> bool:
        return not any(
            self._db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() for table in TABLES
        )

    def _make_schema(self) -> None:
        """Refuse a database not ours, then make the tables it lacks."""
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_KEY,))
            found: dict[str, list[str]] = {}
            for table, column in self._db.execute(_COLUMNS).fetchall():
                found.setdefault(str(table), []).append(str(column))
            foreign = sorted(set(found) - set(SCHEMA))
            if foreign:
                raise StoreError(
                    f"the scheduler database {self.where} is not ours (it holds tables "
                    f"{', '.join(foreign)}): give a database of its own"
                )
            for table, columns in SCHEMA.items():
                ours = [line.split()[0] for line in columns.split(",\n")]
                ours = [name for name in ours if name != "PRIMARY"]
                if table in found and found[table] != ours:
                    raise StoreError(
                        f"the scheduler database {self.where} is not ours (its table {table} "
                        f"has columns {', '.join(found[table])}): give a database of its own"
                    )
                self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")

    def fence(self, epoch: int) -> None:
        """Write only while the lease of `epoch` is this process's (see lease.py); `new`
        is now whether it holds nothing as this process begins to lead."""
        self._epoch = epoch
        self.new = self._empty()

    def close(self) -> None:
        self._db.close()

    def _connection(self) -> psycopg.Connection[tuple[object, ...]]:
        """The connection, made again if the last one was lost."""
        if self._db.closed or self._db.broken:
            self._db.close()
            self._db = connect(self.url)
        return self._db

    @contextmanager
    def transaction(self) -> Iterator[None]:
        db = self._connection()
        with db.transaction():
            if self._epoch is not None:
                fenced = db.execute(
                    "UPDATE scheduler_leases SET epoch = epoch WHERE name = %s AND epoch = %s",
                    (self.name, self._epoch),
                )
                if fenced.rowcount != 1:
                    raise LeaseLost(
                        f"another scheduler {self.name} leads on {self.where} since this one "
                        f"took its lease (epoch {self._epoch}): it writes nothing more"
                    )
            yield

    def probe(self) -> None:
        """A transaction with the lease's check and nothing else."""
        with self.transaction():
            pass

    def is_refusal(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)

    def _execute(self, sql: str, params: Params = ()) -> Rows:
        return self._connection().execute(_dialect(sql), params)

    def _executemany(self, sql: str, params: Iterable[Params]) -> None:
        with self._connection().cursor() as cursor:
            cursor.executemany(_dialect(sql), params)


def _dialect(sql: str) -> str:
    """The shared queries' `?` placeholders as psycopg's."""
    return sql.replace("?", "%s")


__all__ = ["SCHEMA", "PostgresRepository"]
