"""A file dataset's columnar copy (copies.py): it answers as the files do, and only while
every file is the one it was copied from. A file rewritten in place with its size and
modification time put back, or swapped for another by a rename, is answered from the new
rows at once and copied again; a damaged copy is remade; a file still being written, a
disk nearly full, or a site that said no gets no copy; closing interrupts a copy being
made. (Its answers against the row-by-row reference, NaN and declared categories
included: test_engine.py and test_categories.py read a CSV and a Parquet file copied.)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from helpers import wait_for
from worker_support import Station

from flotta_mqtt.analytics import (
    DatasetSpec,
    FileDataset,
    OperationError,
    copies,
    engine,
    open_dataset,
)
from flotta_mqtt.analytics.plan import Agg, Request
from flotta_mqtt.model.query import Compare

WAIT = 30.0  # seconds: a copy of a few rows takes milliseconds
OVER = Compare(column="x", op=">", value=0.5)
REQUESTS = [Request(OVER, (), (Agg("rows"), Agg("sum", "x")))]


@contextlib.contextmanager
def copied(spec: DatasetSpec | dict[str, object], folder: Path) -> Iterator[FileDataset]:
    """A file dataset answering from its copy (made at once: its files need not settle)."""
    data = open_dataset("p", "w0", DatasetSpec.model_validate(spec))
    assert isinstance(data, FileDataset)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(copies, "SETTLE_SECONDS", 0.0)
        data.start(folder)
        try:
            assert data.copy is not None and data.copy.wait(WAIT), "no copy was made"
            yield data
        finally:
            data.close()


def write(path: Path, xs: list[float]) -> Path:
    pacsv.write_csv(pa.table({"x": xs}), path)
    return path


def answer(data: FileDataset) -> list[float]:
    (found,) = data.aggregate(REQUESTS)
    rows, total = found[()]
    return [rows, total]


def copy_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{copies.SUFFIX}"))


def test_the_copy_answers_for_the_files(tmp_path: Path) -> None:
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    with copied({"paths": [csv]}, tmp_path / "copy") as data:
        with data.copy.reading() as source:  # type: ignore[union-attr]
            assert source is not None and "read_csv" not in source.source
        assert answer(data) == [2, pytest.approx(1.6)]
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o700


def test_a_file_rewritten_with_its_size_and_time_put_back_is_read_anew(tmp_path: Path) -> None:
    """The attack: same size, same modification time, other rows. The change time gives
    it away: answered from the files at once, then from a new copy."""
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    with copied({"paths": [csv]}, tmp_path / "copy") as data:
        assert answer(data) == [2, pytest.approx(1.6)]
        before = csv.stat()
        first = copy_files(tmp_path / "copy")
        write(csv, [0.6, 0.8, 0.2])  # same width: same size
        os.utime(csv, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert csv.stat().st_size == before.st_size
        assert csv.stat().st_mtime_ns == before.st_mtime_ns
        assert answer(data) == [2, pytest.approx(1.4)]
        assert data.copy is not None and data.copy.wait(WAIT)
        assert copy_files(tmp_path / "copy") != first
        with data.copy.reading() as source:
            assert source is not None
            assert answer(data) == [2, pytest.approx(1.4)]


def test_a_file_swapped_by_a_rename_is_read_anew(tmp_path: Path) -> None:
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    with copied({"paths": [csv]}, tmp_path / "copy") as data:
        assert answer(data) == [2, pytest.approx(1.6)]
        other = write(tmp_path / "other.csv", [0.1, 0.2, 0.9])
        stats = csv.stat()
        os.utime(other, ns=(stats.st_atime_ns, stats.st_mtime_ns))
        other.replace(csv)
        assert answer(data) == [1, pytest.approx(0.9)]


def test_a_file_still_being_written_is_not_copied(tmp_path: Path) -> None:
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    data = open_dataset("p", "w0", DatasetSpec(paths=[csv]))
    data.start(tmp_path / "copy")  # the CSV was written now: it has not settled
    try:
        assert isinstance(data, FileDataset) and data.copy is not None
        assert not data.copy.wait(0.3)
        assert answer(data) == [2, pytest.approx(1.6)]
        assert copy_files(tmp_path / "copy") == []
    finally:
        data.close()


def test_a_site_can_do_without_a_copy(tmp_path: Path) -> None:
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    data = open_dataset("p", "w0", DatasetSpec(paths=[csv], columnar_copy=False))
    data.start(tmp_path / "copy")
    try:
        assert isinstance(data, FileDataset) and data.copy is None
        assert answer(data) == [2, pytest.approx(1.6)]
        assert not (tmp_path / "copy").exists()
    finally:
        data.close()


def test_no_copy_where_it_would_fill_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(copies, "RESERVE_BYTES", 1 << 62)
    monkeypatch.setattr(copies, "SETTLE_SECONDS", 0.0)
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    data = open_dataset("p", "w0", DatasetSpec(paths=[csv]))
    with caplog.at_level(logging.WARNING, logger=copies.__name__):
        data.start(tmp_path / "copy")
        try:
            assert isinstance(data, FileDataset) and data.copy is not None
            assert not data.copy.wait(0.5)
            assert answer(data) == [2, pytest.approx(1.6)]
        finally:
            data.close()
    assert "no copy of its files" in caplog.text and "are kept free" in caplog.text
    assert copy_files(tmp_path / "copy") == []


def test_a_restarted_worker_reuses_its_copy_and_remakes_a_damaged_one(tmp_path: Path) -> None:
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    folder = tmp_path / "copy"
    with copied({"paths": [csv]}, folder):
        (made,) = copy_files(folder)
    kept = made.stat()
    with copied({"paths": [csv]}, folder) as data:
        assert copy_files(folder) == [made] and made.stat().st_ino == kept.st_ino
        assert answer(data) == [2, pytest.approx(1.6)]
    made.write_bytes(b"not a database" * 1000)
    with copied({"paths": [csv]}, folder) as data:
        assert answer(data) == [2, pytest.approx(1.6)]
        assert copy_files(folder) == [made] and made.read_bytes()[:14] != b"not a database"


def test_no_copy_of_a_bzip2_csv_nor_without_a_state_folder(tmp_path: Path) -> None:
    """A bzip2 CSV is streamed to the engine from Python: a copy of it interrupted could
    crash the process at its exit. A worker without a state folder keeps no copy."""
    path = tmp_path / "t.csv.bz2"
    with pa.CompressedOutputStream(str(path), "bz2") as out:
        pacsv.write_csv(pa.table({"x": [0.7, 0.9, 0.1]}), out)
    bzip2 = open_dataset("p", "w0", DatasetSpec(paths=[path]))
    assert isinstance(bzip2, FileDataset) and bzip2.copy is None
    assert answer(bzip2) == [2, pytest.approx(1.6)]
    csv = open_dataset("p", "w0", DatasetSpec(paths=[write(tmp_path / "t.csv", [0.7])]))
    assert isinstance(csv, FileDataset) and csv.copy is not None
    csv.start(None)
    try:
        assert not csv.copy.wait(0.3)
    finally:
        csv.close()


def test_a_query_reading_the_copy_outlives_its_replacement_and_the_close(
    tmp_path: Path,
) -> None:
    """The copy a query holds stays attached until the query lets it go, though a new copy
    replaced it or the dataset closed; then it is detached."""
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    with copied({"paths": [csv]}, tmp_path / "copy") as data:
        assert data.copy is not None
        with data.copy.reading() as held:
            assert held is not None
            write(csv, [0.6, 0.8, 0.7])
            assert data.copy.wait(WAIT)  # a new copy, of the new rows, answers now
            assert answer(data) == [3, pytest.approx(2.1)]
            assert rows(held.source) == 3
        assert held.alias not in attached()
        with data.copy.reading() as last:
            assert last is not None
            data.close()
            assert rows(last.source) == 3
        assert last.alias not in attached()


def rows(source: str) -> int:
    with engine.database().cursor() as con:
        (found,) = con.execute(f"SELECT count(*) FROM {source}").fetchall()
    return int(found[0])


def attached() -> set[str]:
    with engine.database().cursor() as con:
        found = con.execute("SELECT database_name FROM duckdb_databases()").fetchall()
    return {name for (name,) in found}


def test_a_copy_made_otherwise_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change to how copies are made (engine.COPY_FORMAT) makes them again."""
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    with copied({"paths": [csv]}, tmp_path / "copy"):
        (first,) = copy_files(tmp_path / "copy")
    monkeypatch.setattr(engine, "COPY_FORMAT", engine.COPY_FORMAT + "; another")
    with copied({"paths": [csv]}, tmp_path / "copy"):
        (second,) = copy_files(tmp_path / "copy")
    assert second != first and not first.exists()


def test_a_copy_failing_a_query_is_given_up_and_the_files_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    with copied({"paths": [csv]}, tmp_path / "copy") as data:
        scan = engine.scan

        def failing_on_the_copy(*args: Any) -> Any:
            if args[5:] == (True,):  # copied
                raise engine.EngineError("IOException")
            return scan(*args)

        monkeypatch.setattr(engine, "scan", failing_on_the_copy)
        assert answer(data) == [2, pytest.approx(1.6)]
        assert data.copy is not None and not data.copy.wait(0.3)
        with data.copy.reading() as source:
            assert source is None


def test_a_job_at_fault_leaves_the_copy_in_use(tmp_path: Path) -> None:
    """A job the files fail as well (a number compared with text) fails, and the copy
    still answers the next one: a user cannot turn a site's copy off."""
    csv = tmp_path / "t.csv"
    pacsv.write_csv(pa.table({"x": [0.7, 0.9, 0.1], "s": ["a", "b", "c"]}), csv)
    with copied({"paths": [csv]}, tmp_path / "copy") as data:
        wrong = Request(Compare(column="s", op=">", value=1e308), (), (Agg("rows"),))
        with pytest.raises(OperationError):
            data.aggregate([wrong])
        assert data.copy is not None and data.copy.wait(0)
        assert answer(data) == [2, pytest.approx(1.6)]


def test_datasets_sharing_a_folder_keep_their_own_copies(tmp_path: Path) -> None:
    one = write(tmp_path / "one.csv", [0.7])
    two = write(tmp_path / "two.csv", [0.9])
    with copied({"paths": [one]}, tmp_path / "copy"), copied({"paths": [two]}, tmp_path / "copy"):
        assert len(copy_files(tmp_path / "copy")) == 2


def test_files_changing_as_often_as_they_are_copied_are_copied_less_and_less_often(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each copy thrown away because its files changed meanwhile doubles the wait before
    the next: a file touched all the time does not keep the cores copying."""
    monkeypatch.setattr(copies, "SETTLE_SECONDS", 0.0)
    made: list[float] = []
    database = engine.copy_database

    def counted(path: Path) -> engine.Connection:
        made.append(time.monotonic())
        return database(path)

    monkeypatch.setattr(engine, "copy_database", counted)
    csv = write(tmp_path / "t.csv", [0.7])
    slow = "CREATE TABLE data AS SELECT count(*) AS x FROM range(20000000)"
    copy = copies.ColumnarCopy([csv], slow, "w0")
    stop = threading.Event()

    def touching() -> None:
        while not stop.wait(0.005):
            os.utime(csv)  # a new change time each time

    toucher = threading.Thread(target=touching)
    toucher.start()
    copy.start(tmp_path / "copy")
    try:
        stop.wait(3.0)
    finally:
        stop.set()
        toucher.join()
        copy.close()
    gaps = [b - a for a, b in itertools.pairwise(made)]
    assert len(made) >= 2 and gaps == sorted(gaps), gaps  # ever longer
    assert len(made) <= 8, gaps


def test_closing_interrupts_a_copy_being_made(tmp_path: Path) -> None:
    """A copy of a huge dataset must not hold up the worker's stop."""
    endless = "CREATE TABLE data AS SELECT count(*) FROM range(1000000000000)"
    csv = write(tmp_path / "t.csv", [0.7])
    copy = copies.ColumnarCopy([csv], endless, "w0")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(copies, "SETTLE_SECONDS", 0.0)
        copy.start(tmp_path / "copy")
        wait_for(lambda: any((tmp_path / "copy").glob("*.partial")), WAIT, "no copy was begun")
        started = time.monotonic()
        copy.close()
    assert time.monotonic() - started < 10
    assert list((tmp_path / "copy").iterdir()) == []


def test_one_copy_is_made_at_a_time_and_one_waiting_closes_at_once(tmp_path: Path) -> None:
    endless = "CREATE TABLE data AS SELECT count(*) FROM range(1000000000000)"
    csv = write(tmp_path / "t.csv", [0.7])
    making = copies.ColumnarCopy([csv], endless, "w0")
    waiting = copies.ColumnarCopy([csv], "CREATE TABLE data AS SELECT 1 AS x", "w0")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(copies, "SETTLE_SECONDS", 0.0)
        making.start(tmp_path / "making")
        wait_for(lambda: any((tmp_path / "making").glob("*.partial")), WAIT, "not begun")
        waiting.start(tmp_path / "waiting")
        try:
            assert not waiting.wait(0.5)  # the other copy is being made
            started = time.monotonic()
            waiting.close()
            assert time.monotonic() - started < 5
        finally:
            making.close()


def test_a_worker_copies_into_its_state_and_stops_copying_when_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(copies, "SETTLE_SECONDS", 0.0)
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    place = Station(tmp_path)
    try:
        agent = place.worker(datasets={"p": {"paths": [csv]}})
        data = agent.datasets["p"]
        assert isinstance(data, FileDataset) and data.copy is not None
        assert data.copy.wait(WAIT)
        assert len(copy_files(tmp_path / "w0-state" / "copies" / "p")) == 1
    finally:
        place.close()
    assert not data.copy.wait(0)  # closed: it answers from the files again
    assert answer(data) == [2, pytest.approx(1.6)]


def test_a_copy_folder_that_cannot_be_made_leaves_the_files_answered_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv = write(tmp_path / "t.csv", [0.7, 0.9, 0.1])
    (tmp_path / "state").write_text("a file where the folder should be")
    data = open_dataset("p", "w0", DatasetSpec(paths=[csv]))
    with caplog.at_level(logging.WARNING, logger=copies.__name__):
        data.start(tmp_path / "state" / "copies")
    try:
        assert "no copy of its files" in caplog.text
        assert answer(data) == [2, pytest.approx(1.6)]  # type: ignore[arg-type]
    finally:
        data.close()


def test_a_file_the_engine_cannot_read_gets_no_copy_and_its_error_quotes_no_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(copies, "SETTLE_SECONDS", 0.0)
    csv = tmp_path / "t.csv"
    # Beyond the first block, which the worker reads at its start for the columns' types.
    csv.write_text("x\n" + "0.7\n" * (3 << 20) + "secret-value\n")
    data = open_dataset("p", "w0", DatasetSpec(paths=[csv], types={"x": "double"}))
    with caplog.at_level(logging.WARNING, logger=copies.__name__):
        data.start(tmp_path / "copy")
        try:
            assert isinstance(data, FileDataset) and data.copy is not None
            assert not data.copy.wait(1.0)
            with pytest.raises(OperationError, match="cannot read its files") as failed:
                data.aggregate(REQUESTS)
        finally:
            data.close()
    assert "no copy of its files" in caplog.text
    assert "secret-value" not in caplog.text and "secret-value" not in str(failed.value)
    assert copy_files(tmp_path / "copy") == []
