"""Resource store: put/get of job products by URL with sha256, the only code importing fsspec.

Messages on the bus stay small: a job's product goes to a local directory or an object
store, and only its URL, sha256 and size travel. Every reader verifies the hash, so a
corrupted or replaced object is detected instead of silently consumed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

from flotta_mqtt.protocol.messages import Resource

_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# What may follow a local root for a URL to map to a path as it is: segments that are not
# empty, do not start with a dot (so no `.` or `..`), and no trailing slash.
_PLAIN_TAIL = re.compile(r"(?:/[A-Za-z0-9_-][A-Za-z0-9._~-]*)+")


# Products up to this size travel inline, as data: URLs (RFC 2397) in the messages that
# carry their Resource: a tiny result costs no file, no object and no read. Such a URL
# (under 170 characters) is no longer than a store URL, so statuses listing products
# stay the size they were.
INLINE_BYTES = 96
# The media type of an artifact's results manifest: a JSON list of Resources, what a
# status carries instead of the results themselves when they are too many for a message.
RESULTS_MANIFEST = "application/vnd.flotta.results+json"


def sha256_hex(data: bytes) -> str:
    """Lowercase hex sha256, the form in which every resource hash travels."""
    return hashlib.sha256(data).hexdigest()


class IntegrityError(Exception):
    """The bytes read do not hash to what the Resource promised."""

    def __init__(self, url: str, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch for {url}: expected {expected}, got {actual}")
        self.url = url
        self.expected = expected
        self.actual = actual


class ResourceNotFound(Exception):
    """Nothing is stored at the URL (never written, deleted, or wrong location)."""

    def __init__(self, url: str) -> None:
        super().__init__(f"resource not found: {url}")
        self.url = url


def _normalise_options(protocol: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Copy the caller's options, moving a top-level S3 `endpoint_url` where s3fs wants it."""
    result = dict(options or {})
    if protocol in ("s3", "s3a") and "endpoint_url" in result:
        client_kwargs = dict(result.get("client_kwargs") or {})
        client_kwargs["endpoint_url"] = result.pop("endpoint_url")
        result["client_kwargs"] = client_kwargs
    return result


def _check_segment(kind: str, value: str) -> None:
    """Ids become path segments; reject anything that could escape or alias a directory."""
    if not _SAFE_SEGMENT.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"unsafe {kind} for a resource path: {value!r}")


class ResourceStore:
    """Put and get resources under one root URL (local directory or s3 bucket/prefix)."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self._options = _normalise_options(get_protocol(root), storage_options)
        fs, path = fsspec.url_to_fs(root, **self._options)
        protocol = fs.protocol
        self._protocols: tuple[str, ...] = (protocol,) if isinstance(protocol, str) else protocol
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path, exist_ok=True)
        self.root: str = fs.unstrip_protocol(path).rstrip("/")
        # A local root's filesystem and path, for the URLs under it (see _fs_for).
        self._local: tuple[Any, str] | None = None
        if isinstance(fs, LocalFileSystem):
            self._local = (fs, str(path).rstrip("/"))
        self._folders: set[str] = set()  # local folders known to exist (writes skip makedirs)

    def _fs_for(self, url: str) -> tuple[Any, str]:
        """The filesystem for any URL; this store's credentials go only to its own protocol.

        A plain URL under a local root (every product, log and job file this store
        writes) maps to a path directly: fsspec's parsing of each URL cost about an eighth
        of a worker's CPU per no-op job.
        """
        if (
            self._local is not None
            and url.startswith(self.root)
            and _PLAIN_TAIL.fullmatch(url, len(self.root)) is not None
        ):
            fs, base = self._local
            return fs, base + url[len(self.root) :]
        options = self._options if get_protocol(url) in self._protocols else {}
        fs, path = fsspec.url_to_fs(url, **options)
        return fs, str(path)

    def product_url(
        self, artifact_id: str, job_id: str, attempt: int, name: str = "product"
    ) -> str:
        """Where one attempt of a job writes its product; attempts never overwrite each other.

        Products sit side by side in their artifact's folder (`~` cannot occur in the
        parts): a folder per job cost two mkdir calls per job, several times the write.
        """
        _check_segment("artifact_id", artifact_id)
        _check_segment("job_id", job_id)
        _check_segment("name", name)
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        return f"{self.root}/artifacts/{artifact_id}/jobs/{job_id}~{attempt}~{name}"

    def artifact_url(self, artifact_id: str) -> str:
        """The folder of everything stored for one artifact: products, results, job
        files, logs (what pruning it deletes)."""
        _check_segment("artifact_id", artifact_id)
        return f"{self.root}/artifacts/{artifact_id}"

    def results_url(self, artifact_id: str) -> str:
        """Where the scheduler lists an artifact's results when they are many."""
        _check_segment("artifact_id", artifact_id)
        return f"{self.root}/artifacts/{artifact_id}/results.json"

    def results(self, resources: list[Resource]) -> list[Resource]:
        """An artifact's results as its status gives them, with a manifest expanded."""
        if len(resources) == 1 and resources[0].media_type == RESULTS_MANIFEST:
            return [Resource.model_validate(r) for r in json.loads(self.get(resources[0]))]
        return resources

    def job_file_url(self, artifact_id: str, path: str) -> str:
        """Where a workflow's shared job file lives: one folder per artifact, any worker."""
        _check_segment("artifact_id", artifact_id)
        for segment in path.split("/"):
            _check_segment("job file path segment", segment)
        return f"{self.root}/artifacts/{artifact_id}/files/{path}"

    def log_url(self, artifact_id: str, task: str, attempt: int, stream: str) -> str:
        """Where a task's captured stdout or stderr of one attempt is kept."""
        for kind, value in (("artifact_id", artifact_id), ("task", task), ("stream", stream)):
            _check_segment(kind, value)
        return f"{self.root}/artifacts/{artifact_id}/logs/{task}/attempt-{attempt}.{stream}"

    def put(self, url: str, data: bytes, media_type: str = "application/json") -> Resource:
        """Write `data` at `url` so readers see either nothing, old bytes or all new bytes."""
        fs, path = self._fs_for(url)
        if isinstance(fs, LocalFileSystem):
            _write_local_atomically(path, data, self._folders)
        else:
            # A single object PUT is atomic on object stores: no partial object is visible.
            fs.pipe_file(path, data)
        return Resource(url=url, sha256=sha256_hex(data), size=len(data), media_type=media_type)

    def put_product(
        self,
        artifact_id: str,
        job_id: str,
        attempt: int,
        data: bytes,
        media_type: str = "application/json",
    ) -> Resource:
        """Store a job attempt's product at its derived URL, or inline if it is tiny."""
        if len(data) <= INLINE_BYTES:
            url = f"data:{media_type};base64,{base64.b64encode(data).decode()}"
            return Resource(url=url, sha256=sha256_hex(data), size=len(data), media_type=media_type)
        return self.put(self.product_url(artifact_id, job_id, attempt), data, media_type)

    def get(self, resource: Resource) -> bytes:
        """Read a resource and verify its sha256; bytes that fail the check are never returned."""
        data = self.get_bytes(resource.url)
        actual = sha256_hex(data)
        if actual != resource.sha256:
            raise IntegrityError(resource.url, resource.sha256, actual)
        return data

    def get_bytes(self, url: str) -> bytes:
        """Read raw bytes without verification (callers that hold a Resource use `get`)."""
        if url.startswith("data:"):
            return _inline_bytes(url)
        fs, path = self._fs_for(url)
        try:
            data: bytes = fs.cat_file(path)
        except FileNotFoundError as exc:
            raise ResourceNotFound(url) from exc
        return data

    def exists(self, url: str) -> bool:
        """Whether something is stored at `url`, as the backend sees it now."""
        fs, path = self._fs_for(url)
        # Other nodes write behind this process's back; a cached listing could be stale.
        fs.invalidate_cache(path)
        return bool(fs.exists(path))

    def delete(self, url: str) -> None:
        """Remove the object at `url`; deleting what is already gone is not an error."""
        fs, path = self._fs_for(url)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    def delete_tree(self, url: str) -> None:
        """Remove the folder `url` and every object under it (and no sibling whose name
        it begins); deleting what is already gone is not an error."""
        fs, path = self._fs_for(url)
        folder = path.rstrip("/") + "/"
        fs.invalidate_cache(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(folder, recursive=True)


def _inline_bytes(url: str) -> bytes:
    """The bytes of a base64 data: URL, as `put_product` writes them."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ResourceNotFound(url)  # not a data: URL this store wrote
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise ResourceNotFound(url) from None


def _write_local_atomically(path: str, data: bytes, folders: set[str]) -> None:
    """Write to a unique hidden sibling, then rename it over the target.

    `os.replace` is atomic within a directory, so a concurrent reader sees the old file
    or the complete new one, and a crash of the writing process leaves at most a stray
    temporary file (what was written is in the page cache, which outlives the process).

    No fsync: the file's own fsync would not make it survive a power loss either, since
    the rename is durable only once the directory is too, and a directory fsync costs
    more than a whole no-op job (bench/README.md). So a product is as durable as the
    scheduler's database and the worker's journal, both SQLite WAL with synchronous=NORMAL:
    safe across process crashes, on disk after a power loss once the file system commits
    (ext4's data=ordered writes the data before the rename that names it).
    """
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.urandom(8).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        if directory not in folders:
            raise FileNotFoundError(directory)
        fd = os.open(tmp, flags, 0o666)
    except FileNotFoundError:  # not made yet, or removed since
        os.makedirs(directory, exist_ok=True)
        folders.add(directory)
        fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        # The temporary file is gone if the rename happened; otherwise do not leave it behind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
