"""A small disk for the storage fault tests: a tmpfs of its own (root only), filled to the
last byte and freed again, or made read-only, unmounted at the end whatever happened.

A filler file takes every free page, so any write needing a new one fails as on a full
disk (ENOSPC, which SQLite reports as "database or disk is full"); removing it gives the
space back. Real files, a real file system: nothing in the nodes is patched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path
from types import TracebackType


class SmallDisk:
    """A tmpfs of `size` mounted at `path` while in use (`with SmallDisk(...) as disk`)."""

    def __init__(self, path: Path, size: str = "16m") -> None:
        self.path = path
        self.size = size
        self._filler = path / "filler"

    def __enter__(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
        )
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Lazily if a file is still open on it: the mount goes at once, the pages at close.
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True)

    def fill(self) -> None:
        """Take every free byte (in ever smaller writes, down to one)."""
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (1 << 20, 1 << 12, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * chunk)
        finally:
            os.close(fd)
        assert shutil.disk_usage(self.path).free == 0, "the disk is not full"
        try:  # a new page is refused too
            (self.path / "probe").write_bytes(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        else:
            raise AssertionError("the full disk took a new page")
        finally:
            (self.path / "probe").unlink(missing_ok=True)

    def free(self) -> None:
        self._filler.unlink()

    def read_only(self) -> None:
        """Remount it read-only (refused while a file on it is open for writing)."""
        command = ["mount", "-o", "remount,ro", str(self.path)]
        subprocess.run(command, check=True, capture_output=True)
