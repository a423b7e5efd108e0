"""Workspaces: the caller's project folder as one deterministic archive named by its hash.

The same files give the same bytes, so the same sha256: two callers with the same files
share one archive in the store and one unpacked folder on each worker, and a changed file
gives a new hash, so a worker never runs a mixture of old and new code.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from flotta_mqtt.functions.ignore import ALWAYS_IGNORED, IgnoreRules

MANIFEST = ".flotta-workspace.json"  # reserved: a file of that name in the folder is skipped
IGNORE_FILES = (".gitignore", ".flottaignore")
FORMAT = 1
# A workspace is code, not data: past this the caller most likely forgot an ignore rule,
# and every worker would download it. Raise it with `configure(max_workspace_bytes=...)`.
MAX_BYTES = 256 * 1024 * 1024
# Room for each member's headers (a long name's pax header, say) and padding in the tar
# stream, beyond its data: what a worker decompresses is bounded by the data limit plus
# this much per member allowed.
HEADER_ROOM = 8 * 1024
_MTIME = 0  # every entry's modification time: the epoch, so the bytes depend on content only


class WorkspaceTooLarge(ValueError):
    """The files to ship add up to more than the limit; names the biggest."""


class UnsafeArchive(ValueError):
    """A workspace archive holding what no workspace holds: refused before anything is written."""


@dataclass(frozen=True)
class Workspace:
    """A packed workspace: its archive bytes, their hash, and what it holds."""

    root: Path
    data: bytes
    sha256: str
    manifest: dict[str, Any]
    files: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The archive's file name in the store's `workspaces/` folder."""
        return f"{self.sha256}.tar.gz"


def walk(
    root: Path, extra: Iterable[str] = (), exclude: Iterable[Path] = ()
) -> Iterator[tuple[str, Path]]:
    """The files to ship, as (relative POSIX path, absolute path), in sorted order.

    Ignore files are read as the walk enters their folder; an excluded folder is never
    entered. Symbolic links to files are shipped as the files they point to; links to
    folders are not followed (they could loop or leave the workspace).
    """
    root = root.resolve()
    rules = IgnoreRules.from_lines(ALWAYS_IGNORED)
    rules.extend(extra)
    skipped = {path.resolve() for path in exclude}

    def visit(folder: Path, relative: str) -> Iterator[tuple[str, Path]]:
        for name in IGNORE_FILES:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                rules.extend((folder / name).read_text().splitlines(), base=relative)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except PermissionError:
            return
        for entry in entries:
            path = f"{relative}/{entry.name}" if relative else entry.name
            if path == MANIFEST or Path(entry.path).resolve() in skipped:
                continue
            if entry.is_dir(follow_symlinks=False):
                if not rules.decides(path, is_dir=True):
                    yield from visit(Path(entry.path), path)
            elif entry.is_file(follow_symlinks=True) and not rules.decides(path, is_dir=False):
                yield path, Path(entry.path)

    # Sorting per folder by name is not the same as sorting the full paths ("a/b" vs
    # "a.txt"), so sort once more: the archive's order is the sorted list of paths.
    yield from sorted(visit(root, ""))


def pack(
    root: Path | str,
    requirements: Iterable[str] = (),
    ignore: Iterable[str] = (),
    exclude: Iterable[Path] = (),
    max_bytes: int = MAX_BYTES,
) -> Workspace:
    """Pack the folder into a deterministic tar.gz with its manifest; hash it.

    Entries are sorted, and every header carries a fixed mtime, owner and mode (0644, or
    0755 for executables), the gzip header no name and no time. (The hash is of the
    compressed bytes, so two machines whose zlib compresses differently name the same
    files differently: a lost chance to share, never a wrong result.) The manifest
    (`MANIFEST`) holds the format, the caller's Python version, the declared requirements
    and every file with its size and sha256, so a worker can report what it lacks before
    it runs anything.
    """
    folder = Path(root).resolve()
    if not folder.is_dir():
        raise NotADirectoryError(f"the workspace {folder} is not a folder")
    files = list(walk(folder, ignore, exclude))
    sizes = [(path, absolute.stat().st_size) for path, absolute in files]
    total = sum(size for _, size in sizes)
    if total > max_bytes:
        largest = sorted(sizes, key=lambda item: -item[1])[:5]
        biggest = ", ".join(f"{path} ({size // 1024} KiB)" for path, size in largest)
        raise WorkspaceTooLarge(
            f"the workspace {folder} holds {total // 1024} KiB to ship, over the limit of "
            f"{max_bytes // 1024} KiB; the biggest files: {biggest}. Keep data out with "
            ".gitignore or .flottaignore rules, or raise max_workspace_bytes"
        )
    tar_buffer = io.BytesIO()
    listed: list[dict[str, Any]] = []
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, absolute in files:
            data = absolute.read_bytes()
            executable = bool(absolute.stat().st_mode & stat.S_IXUSR)
            _add(tar, path, data, 0o755 if executable else 0o644)
            listed.append(
                {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        manifest = {
            "format": FORMAT,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "requirements": sorted(set(requirements)),
            "files": listed,
        }
        encoded = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _add(tar, MANIFEST, encoded, 0o644)
    gz_buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz_buffer, compresslevel=6, mtime=0) as gz:
        gz.write(tar_buffer.getvalue())
    data = gz_buffer.getvalue()
    return Workspace(
        root=folder,
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        manifest=manifest,
        files=[path for path, _ in files],
    )


def _add(tar: tarfile.TarFile, path: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(path)
    info.size = len(data)
    info.mtime = _MTIME
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an unpacked workspace."""
    manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
    return manifest


def unpack(data: bytes, target: Path, max_bytes: int, max_members: int) -> Path:
    """Unpack an archive into `target`, atomically: the folder appears complete or not at all.

    Concurrent unpackers of the same hash (threads, or workers sharing a state folder)
    each unpack beside it and rename; the first rename wins and the others discard their
    copy. Every member is checked before anything is written (see `checked_members`),
    whoever made the archive, and written here member by member: the same on every Python
    this project supports, with or without tarfile's `filter=` (3.11.4+). The limits are
    the worker's: at most `max_members` members and `max_bytes` of data, as the headers
    declare them before anything is written, and as decompressed throughout (`_Capped`).
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    try:
        stream = _Capped(
            gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb"),
            max_bytes + max_members * HEADER_ROOM,
            _too_large(max_bytes),
        )
        with stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            members = checked_members(tar, max_bytes, max_members)
            scratch.mkdir()
            for info, parts in members:
                _extract(tar, info, scratch.joinpath(*parts))
        try:
            os.rename(scratch, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def checked_members(
    tar: tarfile.TarFile, max_bytes: int, max_members: int
) -> list[tuple[tarfile.TarInfo, tuple[str, ...]]]:
    """The archive's members with their relative path parts; UnsafeArchive on the first bad one.

    A workspace holds files and folders only (`pack` writes nothing else): an absolute
    name, a `..`, a link of either kind, a device or a FIFO is refused, as are archives of
    more than `max_members` members or `max_bytes` unpacked.
    """
    members: list[tuple[tarfile.TarInfo, tuple[str, ...]]] = []
    total = 0
    for info in tar:
        if len(members) >= max_members:
            raise UnsafeArchive(
                f"the workspace archive holds more than {max_members:,} members, "
                "the worker's limit (policy.max_workspace_members)"
            )
        name = info.name
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts:
            raise UnsafeArchive(
                f"the workspace archive's member {name!r} would be written outside its folder"
            )
        if not (info.isfile() or info.isdir()):
            raise UnsafeArchive(
                f"the workspace archive's member {name!r} is a {_kind(info)}: "
                "a workspace holds only files and folders"
            )
        if info.isfile() and not path.parts:
            raise UnsafeArchive(f"the workspace archive's member {name!r} is a file without a name")
        total += info.size
        if total > max_bytes:
            raise UnsafeArchive(_too_large(max_bytes))
        members.append((info, path.parts))
    return members


def _too_large(max_bytes: int) -> str:
    return (
        f"the workspace archive unpacks to more than {max_bytes:,} bytes, "
        "the worker's limit (policy.max_workspace_bytes)"
    )


class _Capped(io.RawIOBase):
    """A decompressing stream that refuses to be read or sought past `limit` bytes.

    Member sizes are checked from the headers, but a header is itself read whole (a pax
    header of gigabytes of zeros compresses to a few megabytes): this bounds what the
    worker decompresses at all, whatever the archive says.
    """

    def __init__(self, stream: gzip.GzipFile, limit: int, message: str) -> None:
        super().__init__()
        self._stream = stream
        self._limit = limit
        self._message = message

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._stream.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET:
            raise io.UnsupportedOperation("only absolute seeks (tarfile makes no others)")
        if offset > self._limit:
            raise UnsafeArchive(self._message)
        return self._stream.seek(offset)

    def read(self, size: int | None = -1) -> bytes:
        room = self._limit - self._stream.tell()
        wanted = room + 1 if size is None or size < 0 else min(size, room + 1)
        data = self._stream.read(wanted)
        if len(data) > room:
            raise UnsafeArchive(self._message)
        return data

    def close(self) -> None:
        self._stream.close()
        super().close()


def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo, destination: Path) -> None:
    """One checked member: a folder, or a file 0644 (0755 if executable), owned by us."""
    if info.isdir():
        destination.mkdir(parents=True, exist_ok=True)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(info)
    assert source is not None  # a regular file always has its data
    with source, destination.open("wb") as sink:
        shutil.copyfileobj(source, sink)
    destination.chmod(0o755 if info.mode & stat.S_IXUSR else 0o644)


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"symbolic link to {info.linkname!r}"
    if info.islnk():
        return f"hard link to {info.linkname!r}"
    if info.ischr() or info.isblk():
        return "device file"
    if info.isfifo():
        return "FIFO"
    return f"member of tar type {info.type!r}"


def missing_requirements(requirements: Iterable[str]) -> list[str]:
    """The declared requirements this interpreter does not satisfy, each with the reason.

    Checked against the installed distributions' metadata (versions with `packaging`
    when it is installed, names only otherwise).
    """
    from importlib import metadata

    missing = []
    for text in requirements:
        parsed = _requirement(text)
        if parsed is None:
            continue  # its environment marker excludes this interpreter
        if isinstance(parsed, str):
            missing.append(f"{text} ({parsed})")
            continue
        name, accepts = parsed
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(f"{text} (not installed)")
            continue
        if not accepts(version):
            missing.append(f"{text} (installed: {version})")
    return missing


def _requirement(text: str) -> tuple[str, Callable[[str], bool]] | str | None:
    """(name, version test) for a requirement line; a reason string if it is unreadable."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # pragma: no cover - without packaging, names only
        name = re.split(r"[\s;<>=!~\[(@]", text.strip(), maxsplit=1)[0]
        return (name, lambda _version: True) if name else "not a requirement"
    try:
        parsed = Requirement(text)
    except InvalidRequirement:
        return "not a requirement this worker can read"
    if parsed.marker is not None and not parsed.marker.evaluate():
        return None
    return parsed.name, lambda version: parsed.specifier.contains(version, prereleases=True)
