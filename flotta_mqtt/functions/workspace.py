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
from pathlib import Path
from typing import Any

from flotta_mqtt.functions.ignore import ALWAYS_IGNORED, IgnoreRules

MANIFEST = ".flotta-workspace.json"  # reserved: a file of that name in the folder is skipped
IGNORE_FILES = (".gitignore", ".flottaignore")
FORMAT = 1
# A workspace is code, not data: past this the caller most likely forgot an ignore rule,
# and every worker would download it. Raise it with `configure(max_workspace_bytes=...)`.
MAX_BYTES = 256 * 1024 * 1024
_MTIME = 0  # every entry's modification time: the epoch, so the bytes depend on content only


class WorkspaceTooLarge(ValueError):
    """The files to ship add up to more than the limit; names the biggest."""


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


def unpack(data: bytes, target: Path) -> Path:
    """Unpack an archive into `target`, atomically: the folder appears complete or not at all.

    Concurrent unpackers of the same hash (threads, or workers sharing a state folder)
    each unpack beside it and rename; the first rename wins and the others discard their
    copy. Tar's `data` filter refuses absolute paths, `..`, links leaving the folder and
    device files, whoever made the archive.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(scratch, filter="data")
        try:
            os.rename(scratch, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


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
