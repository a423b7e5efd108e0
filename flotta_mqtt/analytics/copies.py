"""A worker's columnar copy of a dataset's files, in the engine's own storage.

A site's files are queried again and again, and parsing them is most of each query: a
1 GB CSV takes over 2 s to scan, the same rows in DuckDB's storage under 0.3 s, in a file
a quarter of the CSV's size (bench/README.md). So a worker with a state folder copies a
file dataset once, in the background, and answers from the copy while every file is
still the one it was copied from: same device, inode, size, modification and change time
(a writer can set the modification time back, not the change time). Until the copy is
ready, and as soon as a file changes, the files are scanned in place and a new copy is
begun. A file changed in the last `SETTLE_SECONDS` is left until it settles, so a file
being written, or one that grows all day, is not copied over and over.

Copies are named after the files' identities, the statement that made them and the
engine's format (engine.COPY_FORMAT): a restarted worker reuses its copy, and never one
of other files or made otherwise. One copy is made at a time per process. A copy is not
begun where it could leave less than `RESERVE_BYTES` free; a dataset can do without
(`columnar_copy: false`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from flotta_mqtt.analytics import engine

log = logging.getLogger(__name__)

SETTLE_SECONDS = 10.0
RESERVE_BYTES = 1 << 30
# A copy's size over its files' is under 1 for a CSV or Parquet file, up to 1.5 for a
# compressed CSV; making it may spill as much again.
ROOM_PER_BYTE = 2
SUFFIX = ".duckdb"
MAX_BACKOFF = 3600.0  # seconds between copies thrown away because their files changed

Identity = tuple[tuple[int, int, int, int, int], ...]
_making = threading.Lock()  # one copy made at a time: each takes every core it can


def identity(paths: Sequence[Path]) -> Identity:
    """What must stay the same for a copy to answer for `paths` (raises OSError if one
    is gone: the in-place scan then says which)."""
    found = []
    for path in paths:
        st = path.stat()
        found.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(found)


class Copy:
    """One copy attached to the engine (`source`: its FROM clause), and the queries
    reading it."""

    def __init__(self, files: Identity, path: Path, alias: str) -> None:
        self.files = files
        self.path = path
        self.alias = alias
        self.source = engine.attach(path, alias)
        self.readers = 0
        self.dropped = False  # detached by its last reader


class ColumnarCopy:
    """The copy of one dataset's files: made, checked before each query, remade."""

    def __init__(self, paths: Sequence[Path], statement: str, who: str) -> None:
        self._paths = list(paths)
        self._statement = statement  # engine.copy_statement of the files
        self._who = who
        self._folder: Path | None = None
        self._current: Copy | None = None
        self._given_up: Identity | None = None  # files whose copy failed: not tried again
        self._lock = threading.Condition()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._building: engine.Connection | None = None
        self._backoff = 0.0  # grows while the files change as often as they are copied
        # Names in the folder are this dataset's (another's copies there are left alone).
        self._prefix = hashlib.sha256(repr((self._paths, statement)).encode()).hexdigest()[:16]

    def start(self, folder: Path) -> None:
        """Begin copying into `folder` (made private)."""
        if self._thread is not None:
            return
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        except OSError as exc:  # the files are scanned in place: nothing is lost
            log.warning("%s: no copy of its files: %s", self._who, exc)
            return
        self._folder = folder
        self._wake.set()
        self._thread = threading.Thread(target=self._keep, name=f"copy {self._who}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop copying (a copy being made is interrupted); the copy is let go once no
        query reads it."""
        self._closing.set()
        self._wake.set()
        # Again until the thread ends: an interrupt before the statement runs is lost.
        while self._thread is not None and self._thread.is_alive():
            with self._lock:
                if self._building is not None:
                    self._building.interrupt()
            self._thread.join(0.05)
        self._replace(None)

    def wait(self, timeout: float) -> bool:
        """Whether a copy of the files as they are now is ready within `timeout` seconds
        (one is begun if they changed)."""
        deadline = time.monotonic() + timeout
        while True:
            files = self._identity()
            with self._lock:
                if self._fresh(files):
                    return True
                copying = self._thread is not None and self._thread.is_alive()
                left = deadline - time.monotonic()
                if left <= 0 or not copying or files == self._given_up:
                    return False
                self._wake.set()
                self._lock.wait(min(left, 1.0))  # the files may change meanwhile

    def give_up(self, copy: Copy) -> None:
        """`copy` failed a query the files answered: they are scanned in place until they
        change (the copy is removed, not to be reused at a restart)."""
        log.warning("%s: its copy failed a query: the files are read in place", self._who)
        with self._lock:
            self._given_up = copy.files
            current = self._current is copy
        if current:
            self._replace(None)
        copy.path.unlink(missing_ok=True)  # a query still reading it keeps its open file

    @contextlib.contextmanager
    def reading(self) -> Iterator[Copy | None]:
        """The copy while the files are those it was made of, or None (the files are to
        be scanned in place; a new copy is begun)."""
        files = self._identity()  # outside the lock: a slow mount holds up no other query
        with self._lock:
            current = self._current if self._fresh(files) else None
            if current is None:
                self._wake.set()
            else:
                current.readers += 1
        if current is None:
            yield None
            return
        try:
            yield current
        finally:
            self._release(current)

    def _identity(self) -> Identity | None:
        try:
            return identity(self._paths)
        except OSError:
            return None

    def _fresh(self, files: Identity | None) -> bool:
        return files is not None and self._current is not None and self._current.files == files

    def _release(self, copy: Copy) -> None:
        with self._lock:
            copy.readers -= 1
            last = copy.readers == 0 and copy is not self._current and not copy.dropped
            copy.dropped = copy.dropped or last
        if last:
            engine.detach(copy.alias)

    def _replace(self, new: Copy | None) -> None:
        """Answer from `new` (None: from the files) from now on; the copy it replaces is
        detached now, or by its last reader."""
        with self._lock:
            old, self._current = self._current, new
            self._lock.notify_all()
            idle = old is not None and old.readers == 0 and not old.dropped
            if old is not None:
                old.dropped = old.dropped or idle
        if old is not None and idle:
            engine.detach(old.alias)

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
            files = self._identity()
            if files is None:
                return  # a file is gone: the next query's in-place scan says which
            with self._lock:
                if self._fresh(files) or files == self._given_up:
                    return
                stale = self._current is not None
            if stale:  # its files changed: it never answers again
                self._replace(None)
            unsettled = max(f[4] for f in files) / 1e9 + SETTLE_SECONDS - time.time()
            if unsettled > 0:  # a change time ahead of the clock waits no longer than this
                self._closing.wait(min(unsettled, SETTLE_SECONDS))
                continue
            path = self._folder / f"{self._prefix}-{self._name(files)}{SUFFIX}"
            reused = path.exists()  # a restarted worker's copy of the same files
            began = time.monotonic()
            if not reused and not self._build(path, files):
                return
            if self._identity() != files:  # changed while it was copied: wait, longer
                path.unlink(missing_ok=True)  # each time, up to MAX_BACKOFF
                self._backoff = min(max(2 * self._backoff, time.monotonic() - began), MAX_BACKOFF)
                self._closing.wait(self._backoff)
                continue
            if self._use(files, path):
                self._backoff = 0.0
                return
            if not reused:  # a copy just made that the engine cannot read: not made again
                with self._lock:
                    self._given_up = files
                return

    def _name(self, files: Identity) -> str:
        """A name for the copy of exactly these files by this engine (after the prefix,
        which names the paths and the statement)."""
        return hashlib.sha256(repr((files, engine.COPY_FORMAT)).encode()).hexdigest()[:32]

    def _build(self, path: Path, files: Identity) -> bool:
        """Write the copy beside its final name, then rename it (a name only ever names a
        whole copy); False if it was not made."""
        while not _making.acquire(timeout=0.05):  # another dataset's copy is being made
            if self._closing.is_set():
                return False
        try:
            return self._build_alone(path, files)
        finally:
            _making.release()

    def _build_alone(self, path: Path, files: Identity) -> bool:
        """_build, the only copy being made in this process."""
        self._clear(keep=path)  # stale copies: they would hold the room
        free = shutil.disk_usage(path.parent).free
        needed = ROOM_PER_BYTE * sum(f[2] for f in files)
        if free - needed < RESERVE_BYTES:
            log.warning(
                "%s: no copy of its files: %d MB free, the copy may take %d MB and %d "
                "MB are kept free",
                self._who,
                free >> 20,
                needed >> 20,
                RESERVE_BYTES >> 20,
            )
            with self._lock:
                self._given_up = files
            return False
        partial = path.with_suffix(".partial")
        started = time.monotonic()
        try:
            self._write(partial)
        except Exception as exc:  # the engine's message may quote the data: its kind
            self._clear(keep=None)
            if not self._closing.is_set():
                log.warning("%s: no copy of its files (%s)", self._who, type(exc).__name__)
                with self._lock:
                    self._given_up = files
            return False
        if self._closing.is_set():
            self._clear(keep=None)
            return False
        partial.replace(path)
        log.info(
            "%s: copied its files in %.1f s (%d MB)",
            self._who,
            time.monotonic() - started,
            path.stat().st_size >> 20,
        )
        return True

    def _write(self, partial: Path) -> None:
        con = engine.copy_database(partial)
        with self._lock:
            self._building = con
        try:
            if not self._closing.is_set():
                engine.write_copy(con, self._statement)
        finally:
            with self._lock:
                self._building = None
            con.close()

    def _clear(self, keep: Path | None) -> None:
        """Remove this dataset's files in its folder but `keep`: older copies (a query
        still reading one keeps its open file), what a failed one left."""
        assert self._folder is not None
        for other in self._folder.glob(f"{self._prefix}-*"):
            if other != keep:
                shutil.rmtree(other) if other.is_dir() else other.unlink(missing_ok=True)

    def _use(self, files: Identity, path: Path) -> bool:
        """Answer from the copy at `path` from now on; False (the file removed) if the
        engine cannot read it: damaged, it is made again."""
        try:
            copy = Copy(files, path, f"copy_{path.stem[17:33]}_{time.monotonic_ns()}")
        except engine.EngineError as exc:
            log.warning("%s: its copy could not be read (%s)", self._who, exc)
            path.unlink(missing_ok=True)
            return False
        self._replace(copy)
        self._clear(keep=path)
        return True
