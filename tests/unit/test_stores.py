"""The nodes' SQLite stores checked when opened: a file that is not SQLite, a damaged one,
and one of another schema are refused with one line naming the file and how to recover,
before anything is written to them; a store whose file goes away while open refuses
writes; and a results manifest in the resource store keeps the bytes it always had.
Real files and real SQLite throughout."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from flotta_mqtt.protocol import Resource
from flotta_mqtt.scheduler.sqlite_repository import SqliteRepository
from flotta_mqtt.sqlite import StoreError, StoreMoved
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker.journal import Journal


def damaged(path: Path) -> None:
    """A SQLite file whose header disagrees with its pages: quick_check reports it."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE jobs (a INTEGER)")
        db.commit()
    with path.open("r+b") as f:
        f.seek(52)  # the largest root page, an auto-vacuum field: nonzero here is wrong
        f.write((7).to_bytes(4, "big"))


def malformed(path: Path) -> None:
    """A SQLite file whose schema page is overwritten: reading it fails at once."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE jobs (a INTEGER)")
        db.commit()
    with path.open("r+b") as f:
        f.seek(100)  # the page header of the schema's table, after the file's header
        f.write(b"\x55" * 8)


def one_line(exc: pytest.ExceptionInfo[StoreError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    ("spoil", "said"),
    [
        (lambda p: p.write_bytes(b"id,value\n1,2\n" * 100), "file is not a database"),
        (damaged, "quick_check: max rootpage (2) disagrees with header (7)"),
        (malformed, "database disk image is malformed"),
    ],
    ids=["not-sqlite", "quick-check", "malformed"],
)
def test_a_damaged_scheduler_database_is_refused_with_how_to_recover(
    tmp_path: Path, spoil: object, said: str
) -> None:
    path = tmp_path / "scheduler.db"
    spoil(path)  # type: ignore[operator]
    before = path.read_bytes()
    with pytest.raises(StoreError) as refused:
        SqliteRepository(path)
    text = one_line(refused)
    assert f"the scheduler database {path} is damaged" in text and said in text
    assert "move it aside" in text and "retained on the broker" in text
    assert path.read_bytes() == before  # nothing written to it
    assert not Path(f"{path}-wal").exists()


def test_a_damaged_worker_journal_is_refused_with_how_to_recover(tmp_path: Path) -> None:
    damaged(tmp_path / "journal.db")
    with pytest.raises(StoreError) as refused:
        Journal(tmp_path)
    text = one_line(refused)
    assert f"the worker journal {tmp_path / 'journal.db'} is damaged" in text
    assert "move it aside" in text and "the scheduler sends it again the jobs" in text


def test_a_store_of_another_kind_is_refused_untouched(tmp_path: Path) -> None:
    """A worker's journal given as the scheduler's database (both have a `jobs` table),
    the other way round, and another program's database."""
    Journal(tmp_path / "worker").close()
    journal = tmp_path / "worker" / "journal.db"
    with pytest.raises(StoreError, match="is not ours"):  # a table of its own, or jobs' columns
        SqliteRepository(journal)

    SqliteRepository(tmp_path / "scheduler.db").close()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "scheduler.db").rename(tmp_path / "elsewhere" / "journal.db")
    with pytest.raises(
        StoreError, match=r"not ours \(it holds tables artifacts, locks, nodes, schedules\)"
    ):
        Journal(tmp_path / "elsewhere")

    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
        db.commit()
    with pytest.raises(StoreError) as refused:
        SqliteRepository(other)
    assert "is not ours (it holds tables invoices)" in one_line(refused)
    with closing(sqlite3.connect(other)) as db:  # none of our tables was added to it
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("invoices",)]


def test_a_store_that_cannot_be_opened_says_why(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as refused:
        SqliteRepository(tmp_path / "missing" / "scheduler.db")
    assert "cannot open the scheduler database" in one_line(refused)
    assert "unable to open database file" in one_line(refused)


def test_a_new_database_says_so_until_it_holds_something(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.db"
    first = SqliteRepository(path)
    assert first.new
    first.close()
    assert SqliteRepository(path).new  # opened, never written: still holds nothing
    with closing(sqlite3.connect(path)) as db:
        db.execute("INSERT INTO nodes VALUES ('w0', '{}')")
        db.commit()
    assert not SqliteRepository(path).new


@pytest.mark.parametrize("how", ["deleted", "moved", "replaced"])
def test_a_database_whose_file_goes_away_refuses_writes(tmp_path: Path, how: str) -> None:
    """Written to, a deleted file would lose at the stop what was acknowledged since."""
    path = tmp_path / "scheduler.db"
    repository = SqliteRepository(path)
    if how == "deleted":
        path.unlink()
    else:
        path.rename(tmp_path / "aside.db")
    if how == "replaced":
        SqliteRepository(path).close()
    said = "replaced" if how == "replaced" else "moved or deleted"
    with pytest.raises(StoreMoved, match=f"was {said} while in use"), repository.transaction():
        pass
    if how == "moved":  # put back: writes go through again
        (tmp_path / "aside.db").rename(path)
        with repository.transaction():
            pass
    repository.close()


def test_a_results_manifest_keeps_its_bytes(tmp_path: Path) -> None:
    """A manifest rewritten at its URL (the same results, a newer scheduler) must still
    match the sha256 a status published before gives for it: its bytes are pinned."""
    store = ResourceStore((tmp_path / "store").as_uri())
    results = [
        Resource(url="artifacts/a1/jobs/0~1~product", sha256="0" * 64, size=3),
        Resource(url="artifacts/a1/jobs/1~2~é", sha256="f" * 64, size=0, media_type="text/csv"),
    ]
    manifest = store.put_results("a1", results)
    assert store.get(manifest, store.artifact_root("a1")) == (
        b'[{"url": "artifacts/a1/jobs/0~1~product", "sha256": "' + b"0" * 64 + b'", '
        b'"size": 3, "media_type": "application/json"}, '
        b'{"url": "artifacts/a1/jobs/1~2~\\u00e9", "sha256": "' + b"f" * 64 + b'", '
        b'"size": 0, "media_type": "text/csv"}]'
    )
    assert store.results([manifest], "a1") == results
