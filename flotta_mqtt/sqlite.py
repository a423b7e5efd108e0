"""The one way the nodes' SQLite stores (scheduler database, worker journal) are opened
and committed.

A store is checked when it is opened, before anything is written to it: a file that is
not SQLite, fails `PRAGMA quick_check`, or holds tables of another schema is refused
with StoreError, one line naming the file, what is wrong and how to recover. Once open,
a write the store refuses (a disk full or read-only, the file moved: `is_refusal`) is
told apart from a bug, so the node can pause and try again instead of dropping work.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path


class StoreError(ValueError):
    """A store that cannot be used as it is: the operator must act (the message says how)."""


class StoreMoved(sqlite3.OperationalError):
    """The store's file was deleted or replaced while open: a write is refused, since it
    would be lost at the stop."""


def is_refusal(exc: BaseException) -> bool:
    """Whether a write failed for the store's sake (a disk full, read-only or failing; the
    file damaged or moved), which may mend, not for the data's (a constraint: a bug)."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


@contextmanager
def transaction(db: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    """Run the block as one transaction on an autocommit connection: all of it or none."""
    db.execute(begin)
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (a full disk) has mostly rolled back already; never leave one open.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def open_store(
    path: Path | str,
    schema: str,
    what: str,
    recovery: str,
    migrate: Callable[[sqlite3.Connection], None] | None = None,
) -> sqlite3.Connection:
    """Open (creating it if new) the store at `path` in WAL mode with `schema`, migrated
    by `migrate`; refuse it with StoreError naming `what` it is and, for a damaged or
    foreign file, the `recovery` to follow."""
    try:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    except sqlite3.OperationalError as exc:
        raise _unopened(what, path, exc) from exc
    reference = _reference(schema)
    try:
        _check(db, reference, f"{what} {path}", recovery)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(schema)
        if migrate is not None:
            migrate(db)
        _check_columns(db, reference, f"{what} {path}")
    except BaseException as exc:
        db.close()
        if isinstance(exc, sqlite3.OperationalError):  # not damage: full, read-only, missing
            raise _unopened(what, path, exc) from exc
        raise
    return db


def _unopened(what: str, path: Path | str, exc: sqlite3.Error) -> StoreError:
    return StoreError(
        f"cannot open the {what} {path}: {exc}; check that its directory exists and is "
        "writable, and that its disk has room"
    )


def file_of(path: str) -> tuple[int, int] | None:
    """The file at `path` (device, inode) as opened, to tell if it is deleted or replaced;
    None for a store in memory."""
    if path == ":memory:":
        return None
    status = os.stat(path)
    return status.st_dev, status.st_ino


def check_in_place(path: str, opened: tuple[int, int] | None) -> None:
    """Raise StoreMoved unless `path` is still the file `opened` (see file_of)."""
    if opened is None:
        return
    try:
        now: tuple[int, int] | None = file_of(path)
    except FileNotFoundError:
        now = None
    if now != opened:
        raise StoreMoved(f"its file was {'replaced' if now else 'moved or deleted'} while in use")


def is_new(db: sqlite3.Connection) -> bool:
    """Whether the store holds no row at all (created now, or never written)."""
    tables = [name for (name,) in db.execute(_TABLES)]
    return not any(db.execute(f'SELECT 1 FROM "{t}" LIMIT 1').fetchone() for t in tables)


_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"


def _check(
    db: sqlite3.Connection, reference: dict[str, list[str]], store: str, recovery: str
) -> None:
    """Refuse a file that is not SQLite, fails quick_check, or holds tables not ours, or
    columns not ours (an earlier version's tables may lack some: a migration adds them);
    reading it only."""
    try:
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        tables = {name for (name,) in db.execute(_TABLES)}
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError):  # cannot open: said by the caller
            raise
        raise StoreError(f"the {store} is damaged ({exc}): {recovery}") from exc
    if problems != ["ok"]:
        lines = "\n".join(problems).splitlines()
        first = next((line for line in lines if line and not line.startswith("***")), "")
        raise StoreError(f"the {store} is damaged (quick_check: {first}): {recovery}")
    foreign = sorted(tables - set(reference))
    if foreign:
        raise StoreError(
            f"the {store} is not ours (it holds tables {', '.join(foreign)}): "
            "give a path to a file of its own"
        )
    _check_columns(db, reference, store, lambda found, ours: found <= ours)


def _check_columns(
    db: sqlite3.Connection,
    reference: dict[str, list[str]],
    store: str,
    fits: Callable[[set[str], set[str]], bool] = lambda found, ours: found == ours,
) -> None:
    """Refuse a table named as ours whose columns do not fit ours (another program's, or
    another kind of store: a worker journal given as a scheduler database)."""
    for table, columns in reference.items():
        found = [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]
        if found and not fits(set(found), set(columns)):
            raise StoreError(
                f"the {store} is not ours (its table {table} has columns "
                f"{', '.join(found)}): give a path to a file of its own"
            )


def _reference(schema: str) -> dict[str, list[str]]:
    """Each table of `schema` and its columns, as SQLite makes them."""
    with closing(sqlite3.connect(":memory:")) as db:
        db.executescript(schema)
        tables = [name for (name,) in db.execute(_TABLES)]
        return {t: [row[1] for row in db.execute(f'PRAGMA table_info("{t}")')] for t in tables}
