"""Workspaces without a broker: the deterministic archive, its ignore rules, its manifest.

The ignore matcher (regular expressions, git's rules) is checked against a small
reference written differently (fnmatch per path segment, recursion for `**`) on generated
patterns and paths.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import sys
import tarfile
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flotta_mqtt.functions import calls
from flotta_mqtt.functions.decorator import selector
from flotta_mqtt.functions.ignore import IgnoreRules, parse_line
from flotta_mqtt.functions.workspace import (
    MANIFEST,
    UnsafeArchive,
    WorkspaceTooLarge,
    missing_requirements,
    pack,
    read_manifest,
    unpack,
)
from flotta_mqtt.workflows.executors.policy import MAX_WORKSPACE_BYTES, MAX_WORKSPACE_MEMBERS

LIMITS = (MAX_WORKSPACE_BYTES, MAX_WORKSPACE_MEMBERS)  # a worker's defaults


def write(root: Path, files: dict[str, str]) -> Path:
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root


PROJECT = {
    "main.py": "print('hi')\n",
    "lib/util.py": "X = 1\n",
    "lib/data/big.csv": "1,2\n",
    "notes.log": "noise\n",
    "keep.log": "kept\n",
    ".gitignore": "# logs and data\n*.log\n!keep.log\nlib/data/\n",
    ".git/HEAD": "ref: refs/heads/main\n",
    "lib/__pycache__/util.cpython-311.pyc": "bytecode",
    ".venv/bin/python": "binary",
}


# --- the archive ----------------------------------------------------------------------------


def test_the_same_files_give_the_same_bytes_wherever_and_whenever(tmp_path: Path) -> None:
    one = write(tmp_path / "one", PROJECT)
    first = pack(one)
    assert pack(one).data == first.data
    # Another folder, other times and permissions, the same content: the same hash.
    two = tmp_path / "elsewhere" / "two"
    shutil.copytree(one, two)
    for path in two.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    (two / "lib" / "util.py").chmod(0o600)
    assert pack(two).sha256 == first.sha256
    # A changed byte, or an executable bit, is another workspace.
    (two / "lib" / "util.py").write_text("X = 2\n")
    assert pack(two).sha256 != first.sha256
    (two / "lib" / "util.py").write_text("X = 1\n")
    (two / "main.py").chmod(0o755)
    assert pack(two).sha256 != first.sha256


def test_ignored_files_stay_out_and_do_not_change_the_hash(tmp_path: Path) -> None:
    root = write(tmp_path, PROJECT)
    packed = pack(root)
    assert packed.files == [".gitignore", "keep.log", "lib/util.py", "main.py"]
    (root / "other.log").write_text("more noise")
    (root / "lib" / "data" / "more.csv").write_text("3,4\n")
    assert pack(root).sha256 == packed.sha256
    # Nested ignore files apply below their own folder; .flottaignore like .gitignore.
    write(root, {"lib/.flottaignore": "util.py\n", "other/util.py": "kept"})
    assert pack(root).files == [
        ".gitignore",
        "keep.log",
        "lib/.flottaignore",
        "main.py",
        "other/util.py",
    ]
    # The caller's own lines and excluded folders (the local store) come on top.
    assert "main.py" not in pack(root, ignore=["main.py"]).files
    assert pack(root, exclude=[root / "other"]).files == [
        ".gitignore",
        "keep.log",
        "lib/.flottaignore",
        "main.py",
    ]


def test_the_manifest_lists_files_requirements_and_python(tmp_path: Path) -> None:
    root = write(tmp_path / "ws", {"a.py": "A = 1\n", "b/c.txt": "c"})
    packed = pack(root, requirements=["numpy>=1.26", "cloudpickle>=3", "numpy>=1.26"])
    manifest = packed.manifest
    assert manifest["requirements"] == ["cloudpickle>=3", "numpy>=1.26"]
    assert manifest["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert [(f["path"], f["size"]) for f in manifest["files"]] == [("a.py", 6), ("b/c.txt", 1)]
    with tarfile.open(fileobj=io.BytesIO(packed.data), mode="r:gz") as tar:
        names = tar.getnames()
        members = tar.getmembers()
        stored = json.loads(tar.extractfile(MANIFEST).read())  # type: ignore[union-attr]
    assert names == ["a.py", "b/c.txt", MANIFEST]
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}
    assert stored == manifest
    # Requirements change the hash: they are part of what a worker needs.
    assert pack(root, requirements=["numpy>=2"]).sha256 != packed.sha256


def test_unpack_restores_the_files_once_and_refuses_escapes(tmp_path: Path) -> None:
    root = write(tmp_path / "ws", {"pkg/__init__.py": "", "pkg/mod.py": "V = 3\n"})
    packed = pack(root)
    target = unpack(packed.data, tmp_path / "unpacked" / packed.sha256, *LIMITS)
    assert (target / "pkg" / "mod.py").read_text() == "V = 3\n"
    assert read_manifest(target)["files"][1]["path"] == "pkg/mod.py"
    (target / "pkg" / "mod.py").write_text("changed")
    assert unpack(packed.data, target, *LIMITS) == target  # already there: left alone
    assert (target / "pkg" / "mod.py").read_text() == "changed"
    assert [p.name for p in target.parent.iterdir()] == [packed.sha256]  # no scratch left

    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.py")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UnsafeArchive, match="outside its folder"):
        unpack(evil.getvalue(), tmp_path / "unpacked" / "evil", *LIMITS)
    assert not (tmp_path / "unpacked" / "escaped.py").exists()


@pytest.fixture
def tarfile_of_python_3_11_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """tarfile as Debian 12's Python 3.11.2 has it: no `filter=` argument, no filters."""
    extractall, extract = tarfile.TarFile.extractall, tarfile.TarFile.extract

    def old_extractall(
        self: tarfile.TarFile, path: str = ".", members: Any = None, *, numeric_owner: bool = False
    ) -> None:
        extractall(self, path, members, numeric_owner=numeric_owner)

    def old_extract(
        self: tarfile.TarFile,
        member: Any,
        path: str = "",
        set_attrs: bool = True,
        *,
        numeric_owner: bool = False,
    ) -> None:
        extract(self, member, path, set_attrs, numeric_owner=numeric_owner)

    monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)
    monkeypatch.setattr(tarfile.TarFile, "extract", old_extract)
    for name in ("data_filter", "tar_filter", "fully_trusted_filter", "FilterError"):
        monkeypatch.delattr(tarfile, name)


def archive(*members: tuple[str, bytes, bytes | None, str]) -> bytes:
    """A tar.gz of (name, tar type, data, link name) members, as a hostile caller makes it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, kind, data, linkname in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, linkname, 0o755
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


GOOD = ("pkg/mod.py", tarfile.REGTYPE, b"V = 3\n", "")


@pytest.mark.usefixtures("tarfile_of_python_3_11_2")
def test_unpack_on_python_3_11_2_restores_a_workspace(tmp_path: Path) -> None:
    root = write(tmp_path / "ws", {"pkg/__init__.py": "", "pkg/mod.py": "V = 3\n"})
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o700)
    packed = pack(root)
    target = unpack(packed.data, tmp_path / "unpacked" / packed.sha256, *LIMITS)
    assert (target / "pkg" / "mod.py").read_text() == "V = 3\n"
    assert read_manifest(target)["files"][0]["path"] == "pkg/__init__.py"
    assert (target / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (target / "pkg" / "mod.py").stat().st_mode & 0o777 == 0o644


@pytest.mark.usefixtures("tarfile_of_python_3_11_2")
@pytest.mark.parametrize(
    ("hostile", "message"),
    [
        (("../escaped.py", tarfile.REGTYPE, b"x", ""), "'../escaped.py' would be written outside"),
        (("pkg/../../escaped.py", tarfile.REGTYPE, b"x", ""), "would be written outside"),
        (("/tmp/escaped.py", tarfile.REGTYPE, b"x", ""), "'/tmp/escaped.py' would be written"),
        (("out", tarfile.SYMTYPE, None, "../../escaped"), "symbolic link to '../../escaped'"),
        (("etc", tarfile.SYMTYPE, None, "/etc"), "symbolic link to '/etc'"),
        (("hard", tarfile.LNKTYPE, None, "/etc/passwd"), "hard link to '/etc/passwd'"),
        (("tty", tarfile.CHRTYPE, None, ""), "'tty' is a device file"),
        (("disk", tarfile.BLKTYPE, None, ""), "'disk' is a device file"),
        (("pipe", tarfile.FIFOTYPE, None, ""), "'pipe' is a FIFO"),
    ],
)
def test_unpack_on_python_3_11_2_refuses_hostile_members(
    tmp_path: Path, hostile: tuple[str, bytes, bytes | None, str], message: str
) -> None:
    data = archive(GOOD, hostile)
    with pytest.raises(UnsafeArchive, match=re.escape(message)):
        unpack(data, tmp_path / "unpacked" / "evil", *LIMITS)
    # Nothing written: neither the folder, nor its scratch copy, nor anything outside.
    assert list((tmp_path / "unpacked").iterdir()) == []
    assert not (tmp_path / "escaped.py").exists()


def bomb(size: int) -> bytes:
    """A tar.gz holding one file of `size` zero bytes: a few KiB that unpack to `size`."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:
        info = tarfile.TarInfo("zeros.bin")
        info.size = size
        gz.write(info.tobuf(format=tarfile.PAX_FORMAT))
        chunk = bytes(1024 * 1024)
        for start in range(0, size, len(chunk)):
            gz.write(chunk[: size - start])
        gz.write(bytes(-size % 512 + 1024))  # padding, then the end-of-archive blocks
    return buffer.getvalue()


def nothing_unpacked(folder: Path) -> bool:
    """Neither the target nor its scratch copy: the folder holding them is empty."""
    return list(folder.iterdir()) == []


@pytest.mark.usefixtures("tarfile_of_python_3_11_2")
def test_a_bomb_over_the_size_limit_is_refused_naming_it_before_anything_is_written(
    tmp_path: Path,
) -> None:
    data = bomb(64 * 1024 * 1024)
    assert len(data) < 200_000, "a bomb: small compressed, large unpacked"
    (tmp_path / "unpacked").mkdir()
    with pytest.raises(UnsafeArchive, match=r"more than 1,048,576 bytes.*max_workspace_bytes"):
        unpack(data, tmp_path / "unpacked" / "bomb", 1024 * 1024, 100)
    assert nothing_unpacked(tmp_path / "unpacked")
    # Within the limit, the same archive unpacks.
    target = unpack(bomb(1000), tmp_path / "unpacked" / "small", 1000, 100)
    assert (target / "zeros.bin").read_bytes() == bytes(1000)


@pytest.mark.usefixtures("tarfile_of_python_3_11_2")
def test_too_many_members_are_refused_naming_the_limit(tmp_path: Path) -> None:
    many = archive(*[(f"f{i}.py", tarfile.REGTYPE, b"", "") for i in range(11)])
    (tmp_path / "unpacked").mkdir()
    with pytest.raises(UnsafeArchive, match=r"more than 10 members.*max_workspace_members"):
        unpack(many, tmp_path / "unpacked" / "many", MAX_WORKSPACE_BYTES, 10)
    assert nothing_unpacked(tmp_path / "unpacked")
    assert (unpack(many, tmp_path / "unpacked" / "ok", MAX_WORKSPACE_BYTES, 11) / "f10.py").exists()


def test_a_header_bomb_is_stopped_while_decompressing(tmp_path: Path) -> None:
    """A pax header is read whole, whatever its size: the decompressed stream's own bound
    stops it, though no member's declared size is over the limit."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:
        size = 32 * 1024 * 1024
        pax = tarfile.TarInfo("././@PaxHeader")
        pax.type, pax.size = tarfile.XHDTYPE, size
        gz.write(pax.tobuf(format=tarfile.USTAR_FORMAT))
        chunk = bytes(1024 * 1024)
        for _ in range(size // len(chunk)):
            gz.write(chunk)
    (tmp_path / "unpacked").mkdir()
    with pytest.raises(UnsafeArchive, match="max_workspace_bytes"):
        unpack(buffer.getvalue(), tmp_path / "unpacked" / "bomb", 1024 * 1024, 10)
    assert nothing_unpacked(tmp_path / "unpacked")


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3000), max_size=8),
    max_bytes=st.integers(min_value=1, max_value=12_000),
    max_members=st.integers(min_value=1, max_value=8),
)
def test_an_archive_unpacks_exactly_when_it_is_within_both_limits(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], max_bytes: int, max_members: int
) -> None:
    data = archive(*[(f"m{i}", tarfile.REGTYPE, b"x" * size, "") for i, size in enumerate(sizes)])
    folder = tmp_path_factory.mktemp("unpacked")
    within = sum(sizes) <= max_bytes and len(sizes) <= max_members
    try:
        target = unpack(data, folder / "ws", max_bytes, max_members)
    except UnsafeArchive as refused:
        assert not within, refused
        assert "max_workspace_" in str(refused)
        assert nothing_unpacked(folder)
    else:
        assert within
        assert [(target / f"m{i}").stat().st_size for i in range(len(sizes))] == sizes


def test_a_workspace_over_the_limit_names_its_biggest_files(tmp_path: Path) -> None:
    root = write(tmp_path, {"small.py": "x", "dataset.bin": "y" * 5000})
    with pytest.raises(WorkspaceTooLarge, match=r"dataset\.bin.*\.flottaignore"):
        pack(root, max_bytes=1024)


def test_missing_requirements_are_reported_with_the_reason() -> None:
    assert missing_requirements(["pytest", "pydantic>=2"]) == []
    missing = missing_requirements(
        ["no-such-package-flotta-xyz", "pytest<1", 'pytest<1; python_version < "3"', "???"]
    )
    assert missing[0] == "no-such-package-flotta-xyz (not installed)"
    assert missing[1].startswith("pytest<1 (installed: ")
    assert missing[2].startswith("??? (not a requirement")
    assert len(missing) == 3  # the marker excludes this interpreter


# --- ignore rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "path", "is_dir", "ignored"),
    [
        (["*.log"], "a/b/c.log", False, True),
        (["*.log", "!keep.log"], "keep.log", False, False),
        (["*.log", "!keep.log"], "sub/keep.log", False, False),
        (["build/"], "build", False, False),  # a file named like the folder stays
        (["build/"], "build/x.o", False, True),
        (["/top.txt"], "top.txt", False, True),
        (["/top.txt"], "sub/top.txt", False, False),
        (["doc/*.md"], "doc/a.md", False, True),
        (["doc/*.md"], "doc/sub/a.md", False, False),
        (["**/cache"], "a/b/cache", True, True),
        (["a/**/z"], "a/z", False, True),
        (["a/**/z"], "a/b/c/z", False, True),
        (["a/**"], "a/b/c", False, True),
        (["a/**"], "a", True, False),
        (["data/", "!data/keep.csv"], "data/keep.csv", False, True),  # parent excluded
        (["# comment", "", "   "], "# comment", False, False),
        (["\\#hash"], "#hash", False, True),
        (["\\!bang"], "!bang", False, True),
        (["file\\ "], "file ", False, True),
        (["trailing   "], "trailing", False, True),
        (["[ab].txt"], "b.txt", False, True),
        (["[!ab].txt"], "c.txt", False, True),
        (["[!ab].txt"], "a.txt", False, False),
        (["?.py"], "ab.py", False, False),
    ],
)
def test_ignore_rules(lines: list[str], path: str, is_dir: bool, ignored: bool) -> None:
    assert IgnoreRules.from_lines(lines).ignored(path, is_dir) is ignored


def test_rules_of_a_nested_ignore_file_apply_below_it_only() -> None:
    rules = IgnoreRules()
    rules.extend(["/local.txt", "*.tmp"], base="sub")
    assert rules.ignored("sub/local.txt")
    assert not rules.ignored("local.txt")
    assert not rules.ignored("sub/deeper/local.txt")
    assert rules.ignored("sub/deeper/x.tmp")
    assert not rules.ignored("x.tmp")
    assert parse_line("# only a comment") is None


def _ref_segments(pattern: list[str], path: list[str]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        if len(pattern) == 1:
            return len(path) >= 1
        return any(_ref_segments(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatchcase(path[0], pattern[0]) and _ref_segments(pattern[1:], path[1:])


def _ref_matches(line: str, path: str, is_dir: bool) -> bool:
    dir_only = line.endswith("/")
    pattern = line.rstrip("/")
    if dir_only and not is_dir:
        return False
    if "/" not in pattern:
        return fnmatchcase(path.split("/")[-1], pattern)
    return _ref_segments(pattern.lstrip("/").split("/"), path.split("/"))


def _ref_ignored(lines: list[str], path: str, is_dir: bool) -> bool:
    """git's rules, written another way: fnmatch per segment, last match wins, parents first."""
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
        here = "/".join(parts[:depth])
        folder = depth < len(parts) or is_dir
        excluded = False
        for line in lines:
            negated = line.startswith("!")
            if _ref_matches(line[1:] if negated else line, here, folder):
                excluded = not negated
        if excluded:
            return True
    return False


segment = st.one_of(st.text(alphabet="ab*?", min_size=1, max_size=3), st.just("**"))
patterns = st.builds(
    lambda neg, lead, segs, trail: (
        ("!" if neg else "") + ("/" if lead else "") + "/".join(segs) + ("/" if trail else "")
    ),
    st.booleans(),
    st.booleans(),
    st.lists(segment, min_size=1, max_size=3),
    st.booleans(),
)
paths = st.lists(st.text(alphabet="ab", min_size=1, max_size=3), min_size=1, max_size=4).map(
    "/".join
)


@settings(max_examples=400, deadline=None)
@given(st.lists(patterns, min_size=1, max_size=4), paths, st.booleans())
def test_the_matcher_agrees_with_a_reference(lines: list[str], path: str, is_dir: bool) -> None:
    assert IgnoreRules.from_lines(lines).ignored(path, is_dir) == _ref_ignored(lines, path, is_dir)


# --- small pieces of the call protocol ------------------------------------------------------


def test_platform_selectors() -> None:
    assert selector("*") == {"allow_code": "yes"}
    assert selector(None) == {"allow_code": "yes"}
    assert selector("linux") == {"platform": "linux", "allow_code": "yes"}
    assert selector("os=linux, gpu=yes") == {"os": "linux", "gpu": "yes", "allow_code": "yes"}
    assert selector({"site": "lab"}) == {"site": "lab", "allow_code": "yes"}


def test_a_sealed_outcome_detects_damage() -> None:
    sealed = calls.seal(calls.Outcome(kind="value", value=calls.dumps([1, 2]), worker="w0"))
    outcome = calls.unseal(sealed)
    assert outcome.worker == "w0" and outcome.value == calls.dumps([1, 2])
    with pytest.raises(ValueError, match="damaged"):
        calls.unseal(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    with pytest.raises(ValueError, match="not a call outcome"):
        calls.unseal(b"something else")
