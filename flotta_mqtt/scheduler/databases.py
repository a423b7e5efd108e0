"""Which repository a scheduler's `database` setting names: a PostgreSQL URL, or a file."""

from __future__ import annotations

from pathlib import Path

from flotta_mqtt.scheduler.postgres_repository import PostgresRepository
from flotta_mqtt.scheduler.repository import Repository
from flotta_mqtt.scheduler.sqlite_repository import SqliteRepository

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(database: Path | str) -> bool:
    return isinstance(database, str) and database.startswith(POSTGRES_SCHEMES)


def open_repository(database: Path | str, name: str) -> Repository:
    """The scheduler `name`'s repository: on PostgreSQL for a postgresql:// URL (schedulers
    of one name share it, one leading), else in the SQLite file at that path."""
    if is_postgres(database):
        return PostgresRepository(str(database), name)
    return SqliteRepository(database)


__all__ = ["POSTGRES_SCHEMES", "is_postgres", "open_repository"]
