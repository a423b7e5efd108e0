"""A worker's columnar copy of a dataset's files, in the engine's own storage.

A site's files are queried again and again, and parsing them is most of each query: a
1 GB CSV takes about 2 s to scan, the same rows in DuckDB's storage 0.15 s, in a file a
third of the CSV's size (bench/README.md). So a worker copies a file dataset once, in the
background, and answers from the copy while every file is still the one it was copied
from: same device, inode, size, modification and change time (a writer can set the
modification time back, not the change time). Until the copy is ready, and as soon as a
file changes, the files are scanned in place and a new copy is begun. A file changed in
the last `SETTLE_SECONDS` is left until it settles, so a file being written, or one that
grows all day, is not copied over and over.

Copies live in the worker's state folder (a private temporary one without it), under
names made from the files' identities: a restarted worker reuses its copy, and a file
left from a copy of other files is never read. A copy takes disk space (no more than its
files, typically less); it is not begun where it would leave less than `RESERVE_BYTES`
free, and a dataset can do without (`columnar_copy: false`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from flotta_mqtt.analytics import engine

log = logging.getLogger(__name__)

SETTLE_SECONDS = 10.0
RESERVE_BYTES = 1 << 30
SUFFIX = ".duckdb"

Identity = tuple[tuple[int, int, int, int, int], ...]
# Fills a copy's new database with the dataset's rows (engine.write_copy).
Writer = Callable[[engine.Connection], None]


def identity(paths: Sequence[Path]) -> Identity:
    """What must stay the same for a copy to answer for `paths` (raises OSError if one
    is gone: the in-place scan then says which)."""
    found = []
    for path in paths:
        st = path.stat()
        found.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(found)


class _Copy:
    """One copy attached to the engine, and the queries reading it."""

    def __init__(self, files: Identity, path: Path, alias: str) -> None:
        self.files = files
        self.path = path
        self.alias = alias
        self.source = engine.attach(path, alias)
        self.readers = 0
        self.superseded = False


class ColumnarCopy:
    """The copy of one dataset's files: made, checked before each query, remade."""

    def __init__(self, paths: Sequence[Path], schema: pa.Schema, write: Writer, who: str) -> None:
        self._paths = list(paths)
        self._schema = schema
        self._write = write
        self._who = who
        self._folder: Path | None = None
        self._temporary = False
        self._current: _Copy | None = None
        self._given_up: Identity | None = None  # files whose copy failed: not tried again
        self._lock = threading.Condition()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._building: engine.Connection | None = None

    def start(self, folder: Path | None) -> None:
        """Begin copying into `folder` (made private), or a private temporary folder."""
        try:
            if folder is None:
                self._folder, self._temporary = Path(tempfile.mkdtemp(prefix="flotta-copy-")), True
            else:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                folder.chmod(0o700)
                self._folder = folder
        except OSError as exc:  # the files are scanned in place: nothing is lost
            log.warning("%s: no copy of its files: %s", self._who, exc)
            return
        self._wake.set()
        self._thread = threading.Thread(target=self._keep, name=f"copy {self._who}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop copying (a copy being made is interrupted) and stop reading the copy."""
        self._closing.set()
        self._wake.set()
        # Again until the thread ends: an interrupt before the statement runs is lost.
        while self._thread is not None and self._thread.is_alive():
            with self._lock:
                if self._building is not None:
                    self._building.interrupt()
            self._thread.join(0.05)
        with self._lock:
            current, self._current = self._current, None
            self._lock.notify_all()  # a waiter: no copy comes
        if current is not None:
            engine.detach(current.alias)
        if self._temporary and self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def wait(self, timeout: float) -> bool:
        """Whether a copy of the files as they are now is ready within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._fresh():
                left = deadline - time.monotonic()
                if left <= 0 or self._closing.is_set():
                    return False
                self._lock.wait(left)
            return True

    @contextlib.contextmanager
    def reading(self) -> Iterator[str | None]:
        """The copy's FROM clause while the files are those it was made of, or None (the
        files are to be scanned in place; a new copy is begun)."""
        with self._lock:
            current = self._current if self._fresh() else None
            if current is None:
                self._wake.set()
            else:
                current.readers += 1
        if current is None:
            yield None
            return
        try:
            yield current.source
        finally:
            with self._lock:
                current.readers -= 1
                idle = current.superseded and current.readers == 0
            if idle:
                engine.detach(current.alias)

    def _fresh(self) -> bool:
        try:
            files = identity(self._paths)
        except OSError:
            return False
        return self._current is not None and self._current.files == files

    # --- the copying thread ----------------------------------------------------------

    def _keep(self) -> None:
        while not self._closing.is_set():
            self._wake.wait()
            self._wake.clear()
            try:
                self._renew()
            except Exception:
                log.exception("%s: the dataset's copy failed", self._who)

    def _renew(self) -> None:
        """Make (or reuse) a copy of the files as they are, once they have settled."""
        assert self._folder is not None
        while not self._closing.is_set():
            try:
                files = identity(self._paths)
            except OSError:
                return  # a file is gone: the next query's in-place scan says which
            with self._lock:
                if self._fresh() or files == self._given_up:
                    return
            unsettled = max(f[4] for f in files) / 1e9 + SETTLE_SECONDS - time.time()
            if unsettled > 0:
                self._closing.wait(unsettled)
                continue
            path = self._folder / f"{self._name(files)}{SUFFIX}"
            kept = path.exists()  # a restarted worker's copy of the same files
            if not kept and not self._made(path, files):
                return
            if identity(self._paths) != files:  # changed while it was copied
                path.unlink(missing_ok=True)
                continue
            if self._use(files, path):
                return
            if not kept:  # a copy just made that the engine cannot read: not made again
                with self._lock:
                    self._given_up = files
                return

    def _name(self, files: Identity) -> str:
        """A name for the copy of exactly these files, typed so, by this engine."""
        key = repr((files, [str(p) for p in self._paths], self._schema.to_string()))
        return hashlib.sha256(f"{key} {engine.COPY_FORMAT}".encode()).hexdigest()[:32]

    def _made(self, path: Path, files: Identity) -> bool:
        """Write the copy beside its final name, then rename it: a name only ever names
        a whole copy."""
        free = shutil.disk_usage(path.parent).free
        needed = sum(f[2] for f in files)
        if free - needed < RESERVE_BYTES:
            log.warning(
                "%s: no copy of its files: %d MB free, the copy may take %d MB and %d MB "
                "are kept free",
                self._who,
                free >> 20,
                needed >> 20,
                RESERVE_BYTES >> 20,
            )
            self._given_up = files
            return False
        partial = path.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        started = time.monotonic()
        try:
            con = engine.copy_database(partial)
            with self._lock:
                self._building = con
            try:
                if not self._closing.is_set():
                    self._write(con)
            finally:
                with self._lock:
                    self._building = None
                con.close()
        except Exception as exc:  # the engine's message may quote the data: only its kind
            partial.unlink(missing_ok=True)
            if not self._closing.is_set():
                log.warning("%s: no copy of its files (%s)", self._who, type(exc).__name__)
                self._given_up = files
            return False
        if self._closing.is_set():
            partial.unlink(missing_ok=True)
            return False
        os.replace(partial, path)
        log.info(
            "%s: copied its files in %.1f s (%d MB)",
            self._who,
            time.monotonic() - started,
            path.stat().st_size >> 20,
        )
        return True

    def _use(self, files: Identity, path: Path) -> bool:
        """Answer from the copy at `path` from now on, and drop the one it replaces;
        False (the file removed) if the engine cannot read it: damaged, it is made again."""
        try:
            copy = _Copy(files, path, f"copy_{path.stem[:16]}_{time.monotonic_ns()}")
        except engine.EngineError as exc:
            log.warning("%s: its copy could not be read (%s)", self._who, exc)
            path.unlink(missing_ok=True)
            return False
        with self._lock:
            old, self._current = self._current, copy
            self._lock.notify_all()
            idle = old is not None and old.readers == 0
            if old is not None:
                old.superseded = True
        if old is not None and idle:
            engine.detach(old.alias)
        for other in path.parent.iterdir():  # older copies, and what a failed one left
            if other != path:
                shutil.rmtree(other) if other.is_dir() else other.unlink(missing_ok=True)
        return True
