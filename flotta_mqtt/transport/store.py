"""Resource store: put/get of job products by URL with sha256, the only code importing fsspec.

Backends: local files (`file://`), S3 (`s3://`, s3fs) and Azure Blob Storage (`az://` or
`abfs://`, adlfs, the `azure` extra), each with its credentials in the storage options or
the environment its library reads (AWS_* for S3, AZURE_STORAGE_* for Azure).

Messages on the bus stay small: a job's product goes to a local directory or an object
store, and only its URL, sha256 and size travel. A URL names a place chosen by another
node, so a read first checks it: only keys under this store's root (or a narrower prefix
the reader knows, such as its artifact's folder) are opened, a declared size over the
cap is refused unopened, no more than the declared size + 1 byte is read, and bytes that
do not hash to the promised sha256 are an error, never used.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol
from pydantic import TypeAdapter

from flotta_mqtt.protocol.messages import Resource
from flotta_mqtt.transport.settings import MAX_READ_BYTES, StorageSettings

_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# A segment of a key under a root, as this store writes them: no `/`, `%`, `?`, `#`, `:`,
# `*` or space, so fsspec finds the object the URL spells (no escapes, queries, globs or
# chained protocols); `.` and `..` are refused apart.
_KEY_SEGMENT = re.compile(r"[A-Za-z0-9._~-]{1,255}")


# Products up to this size travel inline, as data: URLs (RFC 2397) in the messages that
# carry their Resource: a tiny result costs no file, no object and no read. Such a URL
# (under 170 characters) is no longer than a store URL, so statuses listing products
# stay the size they were.
INLINE_BYTES = 96
# The media type of an artifact's results manifest: a JSON list of Resources, what a
# status carries instead of the results themselves when they are too many for a message.
RESULTS_MANIFEST = "application/vnd.flotta.results+json"
_RESULTS = TypeAdapter(list[Resource])  # a RESULTS_MANIFEST's contents


def sha256_hex(data: bytes) -> str:
    """Lowercase hex sha256, the form in which every resource hash travels."""
    return hashlib.sha256(data).hexdigest()


class ResourceError(Exception):
    """A resource that cannot be used; the message names its URL and what is wrong."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(message)
        self.url = url


class IntegrityError(ResourceError):
    """The bytes read are not the ones the Resource promised (their sha256 or size)."""


class ResourceNotFound(ResourceError):
    """Nothing is stored at the URL (never written, deleted, or wrong location)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, f"resource not found: {url}")


class ResourceRefused(ResourceError):
    """A resource refused before anything is read: a URL outside the allowed roots, a
    declared size over the cap, or something other than a regular file."""


def under(url: str, roots: Iterable[str]) -> bool:
    """Whether `url` names a key under one of `roots` (URLs without a trailing slash).

    The root, a slash, then segments of letters, digits and `._~-`, none of them `.` or
    `..`: nothing else, so no other scheme, host, bucket or folder, and no escape, query or
    glob that fsspec would read as something other than the key it spells. The one check
    of every URL this store opens; a narrower root (an artifact's folder, a tenant's
    prefix) is just another root.
    """
    for root in roots:
        if url.startswith(root) and url[len(root) : len(root) + 1] == "/":
            segments = url[len(root) + 1 :].split("/")
            if all(_KEY_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
                return True
    return False


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
    """Put and get resources under one root URL (local directory, S3 or Azure container/prefix).

    Every URL it opens is under that root; `max_read` bounds what one read may hold.
    """

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        max_read: int = MAX_READ_BYTES,
    ) -> None:
        options = _normalise_options(get_protocol(root), storage_options)
        fs, path = fsspec.url_to_fs(root, **options)
        self._fs: Any = fs
        self._path = str(path).rstrip("/")
        self.root: str = fs.unstrip_protocol(self._path).rstrip("/")
        self.max_read = max_read
        # A local root as the kernel resolves it: what an opened file must lie under.
        self._real: str | None = None
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(self._path, exist_ok=True)
            self._real = os.path.realpath(self._path)
        self._folders: set[str] = set()  # local folders known to exist (writes skip makedirs)

    @classmethod
    def of(cls, settings: StorageSettings, group: str | None = None) -> ResourceStore:
        """The store a node's settings name, with their read cap; a scheduler group's
        nodes keep everything under `groups/{group}`, where per-group credentials (an S3
        bucket policy on the prefix) can keep the groups apart."""
        root = settings.url if group is None else f"{settings.url.rstrip('/')}/groups/{group}"
        return cls(root, settings.options, settings.max_read_bytes)

    def _path_of(self, url: str, roots: Iterable[str] | None = None) -> str:
        """The backend path of a URL under `roots` (this store's root by default).

        A string operation, not fsspec's parsing of each URL (which cost about an eighth
        of a worker's CPU per no-op job); ResourceRefused for any URL elsewhere.
        """
        allowed = (self.root,) if roots is None else tuple(roots)
        if not (under(url, allowed) and under(url, (self.root,))):
            raise ResourceRefused(url, f"refused {url}: not a key under {' or '.join(allowed)}")
        return self._path + url[len(self.root) :]

    def artifact_root(self, artifact_id: str) -> str:
        """The folder of everything an artifact's jobs store: what reads for it stay under."""
        _check_segment("artifact_id", artifact_id)
        return f"{self.root}/artifacts/{artifact_id}"

    def product_url(
        self, artifact_id: str, job_id: str, attempt: int, name: str = "product"
    ) -> str:
        """Where one attempt of a job writes its product; attempts never overwrite each other.

        Products sit side by side in their artifact's folder (`~` cannot occur in the
        parts): a folder per job cost two mkdir calls per job, several times the write.
        """
        _check_segment("job_id", job_id)
        _check_segment("name", name)
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        return f"{self.artifact_root(artifact_id)}/jobs/{job_id}~{attempt}~{name}"

    def results_url(self, artifact_id: str) -> str:
        """Where the scheduler lists an artifact's results when they are many."""
        return f"{self.artifact_root(artifact_id)}/results.json"

    def put_results(self, artifact_id: str, results: list[Resource]) -> Resource:
        """Store the list of an artifact's results (its manifest), dumped in one call: a
        dump per result cost ten times more. Written as json.dumps writes it, the bytes
        manifests always had: one rewritten at its URL still matches the sha256 that
        statuses published before give for it."""
        data = json.dumps(_RESULTS.dump_python(results, mode="json")).encode()
        return self.put(self.results_url(artifact_id), data, media_type=RESULTS_MANIFEST)

    def results(self, resources: list[Resource], artifact_id: str) -> list[Resource]:
        """An artifact's results as its status gives them, with a manifest expanded."""
        if len(resources) == 1 and resources[0].media_type == RESULTS_MANIFEST:
            listed = json.loads(self.get(resources[0], self.artifact_root(artifact_id)))
            return [Resource.model_validate(r) for r in listed]
        return resources

    def job_file_url(self, artifact_id: str, job_id: str, attempt: int, path: str) -> str:
        """Where one attempt of a workflow task stores a job file it outputs.

        Per attempt, as products are: a late attempt never replaces the file a finished
        one announced with its sha256.
        """
        _check_segment("job_id", job_id)
        for segment in path.split("/"):
            _check_segment("job file path segment", segment)
        return f"{self.artifact_root(artifact_id)}/files/{job_id}~{attempt}/{path}"

    def log_url(self, artifact_id: str, task: str, attempt: int, stream: str) -> str:
        """Where a task's captured stdout or stderr of one attempt is kept."""
        for kind, value in (("task", task), ("stream", stream)):
            _check_segment(kind, value)
        return f"{self.artifact_root(artifact_id)}/logs/{task}/attempt-{attempt}.{stream}"

    def put(self, url: str, data: bytes, media_type: str = "application/json") -> Resource:
        """Write `data` at `url` so readers see either nothing, old bytes or all new bytes."""
        path = self._path_of(url)
        if self._real is not None:
            _write_local_atomically(path, data, self._folders)
        else:
            # A single object PUT is atomic on object stores: no partial object is visible.
            self._fs.pipe_file(path, data)
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

    def get(self, resource: Resource, *roots: str) -> bytes:
        """The bytes of a resource, checked: the only way a node reads what another wrote.

        Its URL must be a data: URL or a key under `roots` (this store's root if none are
        given); a declared size over `max_read` is refused unopened; at most the declared
        size + 1 byte is read; the bytes must hash to the declared sha256. Anything else
        raises a ResourceError naming the URL, and no byte of it is returned.
        """
        url, size = resource.url, resource.size
        if size > self.max_read:
            raise ResourceRefused(
                url,
                f"refused {url}: its declared size, {size} bytes, is over the read cap of "
                f"{self.max_read} bytes (storage max_read_bytes)",
            )
        if url.startswith("data:"):
            data = _inline_bytes(url)
        else:
            data = self._read(self._path_of(url, roots or None), url, size + 1)
        if len(data) > size:
            raise IntegrityError(url, f"{url} holds more than its declared {size} bytes")
        actual = sha256_hex(data)
        if actual != resource.sha256:
            raise IntegrityError(
                url, f"sha256 mismatch for {url}: expected {resource.sha256}, got {actual}"
            )
        return data

    def get_bytes(self, url: str) -> bytes:
        """Read up to `max_read` bytes under this store's root, unverified: only to show
        (a failed attempt's logs, which no message hashed), never to parse or run."""
        data = self._read(self._path_of(url), url, self.max_read + 1)
        if len(data) > self.max_read:
            raise ResourceRefused(url, f"refused {url}: over the read cap of {self.max_read} bytes")
        return data

    def exists(self, url: str) -> bool:
        """Whether something is stored at `url`, as the backend sees it now."""
        path = self._path_of(url)
        # Other nodes write behind this process's back; a cached listing could be stale.
        self._fs.invalidate_cache(path)
        return bool(self._fs.exists(path))

    def delete(self, url: str) -> None:
        """Remove the object at `url`; deleting what is already gone is not an error."""
        path = self._path_of(url)
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(path)

    def delete_tree(self, url: str) -> None:
        """Remove the folder `url` and every object under it (and no sibling whose name
        it begins); deleting what is already gone is not an error."""
        path = self._path_of(url)
        self._fs.invalidate_cache(path)
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm(path.rstrip("/") + "/", recursive=True)

    def _read(self, path: str, url: str, limit: int) -> bytes:
        """At most `limit` bytes from the start of the object at `path`."""
        if self._real is not None:
            return _read_local(path, url, limit, self._real)
        try:
            data: bytes = self._fs.cat_file(path, start=0, end=limit)
        except FileNotFoundError as exc:
            raise ResourceNotFound(url) from exc
        except Exception:
            # S3 and Azure answer a range of an empty object with 416 (InvalidRange), which
            # s3fs raises as OSError EINVAL and adlfs as the SDK's HttpResponseError.
            self._fs.invalidate_cache(path)
            if self._fs.info(path)["size"] != 0:
                raise
            return b""
        return data


def _read_local(path: str, url: str, limit: int, real_root: str) -> bytes:
    """At most `limit` bytes of a regular file that really lies under `real_root`.

    Not a link (O_NOFOLLOW), not a device or a FIFO (which could be endless or block), and
    the file opened, not just its name, resolves under the root (no linked folder).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise ResourceNotFound(url) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ResourceRefused(url, f"refused {url}: a symbolic link") from None
        raise
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ResourceRefused(url, f"refused {url}: not a regular file")
        if not _opened_path(fd, path).startswith(real_root + "/"):
            raise ResourceRefused(url, f"refused {url}: it resolves outside the store")
        return file.read(limit)


def _opened_path(fd: int, path: str) -> str:
    """Where the open file `fd` really is (Linux's /proc), else `path` resolved."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


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
