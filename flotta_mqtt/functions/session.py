"""The caller's side of distributed functions: settings, the workspace, batching, statuses.

One session per process, created at the first call from `configure()` or, failing that,
from the environment:

- `FLOTTA_BROKER` (an mqtt:// URL) and `FLOTTA_STORAGE` (the shared store's URL), and
  optionally `FLOTTA_WORKSPACE` (the folder to ship);
- inside a worker's call process, the worker's own broker and store settings and the
  workspace it runs in (set by the python executor), so a distributed function may call
  distributed functions: each nested call is a new artifact submitted from the worker,
  shipping the same workspace (already in the store, by hash), and the outer call waits
  for it while holding its slot on its worker. Give the workers room (`max_jobs` above
  the outer calls' `threads`) or the outer calls can fill every slot and wait forever.
  On a broker with per-node identities a worker's identity may not submit: give its call
  processes a workbench identity with `FLOTTA_NESTED_BROKER_JSON` (BrokerSettings as
  JSON) in the worker's environment.

Calls are batched: a background submitter takes what the caller's loop queued and sends it
as one artifact of at most `batch_size` calls (200: a status lists every job of an
artifact of up to 300, each with its product, and must stay under the 256 KiB message
limit) once the batch is full or `linger` seconds (5 ms) after its first call. A
resolver thread follows the artifacts' retained statuses and settles the handles.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import logging
import os
import re
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flotta_mqtt.client.client import Client
from flotta_mqtt.functions import calls
from flotta_mqtt.functions import workspace as workspaces
from flotta_mqtt.functions.handles import CallFailed, CallHandle
from flotta_mqtt.model import ARTIFACT_FINAL, JOB_FINAL, Artifact, JobState, Task, Tasks
from flotta_mqtt.model.artifact import new_artifact_id
from flotta_mqtt.protocol.messages import ArtifactStatus, RequestRejected, Resource
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import ResourceStore

if TYPE_CHECKING:
    from flotta_mqtt.functions.decorator import DistributedFunction

log = logging.getLogger(__name__)

PROJECT = "functions"  # the project of call artifacts (they need no worker's data)
BATCH_CALLS = 200
BATCH_BYTES = 200 * 1024  # of an artifact's encoded tasks, under the 256 KiB message limit
STATUS_BYTES = 200 * 1024  # of a status listing every job with its product
LINGER = 0.005


class NotConfigured(RuntimeError):
    """A distributed function was called before anything said where the cluster is."""


@dataclass(frozen=True)
class Settings:
    """Where calls go and what they ship; see `configure()`."""

    broker: BrokerSettings
    storage: StorageSettings
    workspace: Path | None = None  # the folder to pack (None: the default folder)
    shipped: Resource | None = None  # an archive already in the store (inside a worker)
    requirements: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    max_workspace_bytes: int = workspaces.MAX_BYTES
    batch_size: int = BATCH_CALLS
    linger: float = LINGER
    client_id: str | None = None


_lock = threading.RLock()
_settings: Settings | None = None
_session: Session | None = None


def configure(
    broker: BrokerSettings | str | None = None,
    storage: StorageSettings | str | None = None,
    *,
    workspace: Path | str | None = None,
    requirements: Iterable[str] = (),
    ignore: Iterable[str] = (),
    max_workspace_bytes: int = workspaces.MAX_BYTES,
    batch_size: int = BATCH_CALLS,
    linger: float = LINGER,
) -> None:
    """Say where the cluster is and what to ship; the next call starts a fresh session.

    `broker`/`storage` default to FLOTTA_BROKER/FLOTTA_STORAGE. `workspace` is the
    project folder shipped to workers (default: FLOTTA_WORKSPACE, else the folder of the
    main script, else the working folder); it is packed at the first call after this and
    uploaded only if the store does not hold that hash yet. `requirements` are recorded in
    its manifest (workers report what they lack; they do not install). `ignore` adds
    .gitignore-style lines to the folder's own .gitignore and .flottaignore files.
    Calls already made keep their session until they are settled.
    """
    if not 1 <= batch_size <= 300:
        raise ValueError("batch_size must be between 1 and 300 (the statuses' listing limit)")
    broker = broker or os.environ.get("FLOTTA_BROKER")
    storage = storage or os.environ.get("FLOTTA_STORAGE")
    if broker is None or storage is None:
        missing = " and ".join(
            name for name, value in (("broker", broker), ("storage", storage)) if value is None
        )
        raise NotConfigured(f"configure() needs a {missing} (or FLOTTA_BROKER / FLOTTA_STORAGE)")
    folder = workspace or os.environ.get("FLOTTA_WORKSPACE")
    settings = Settings(
        broker=BrokerSettings(url=broker) if isinstance(broker, str) else broker,
        storage=StorageSettings(url=storage) if isinstance(storage, str) else storage,
        workspace=Path(folder).resolve() if folder else None,
        requirements=tuple(requirements),
        ignore=tuple(ignore),
        max_workspace_bytes=max_workspace_bytes,
        batch_size=batch_size,
        linger=linger,
    )
    global _settings, _session
    with _lock:
        old, _settings, _session = _session, settings, None
    if old is not None:
        old.retire()


def shutdown() -> None:
    """Send what is queued, close the session and forget `configure()`'s settings."""
    global _session, _settings
    with _lock:
        old, _session, _settings = _session, None, None
    if old is not None:
        old.close()


def current(function: str) -> Session:
    """The process's session, started on first use; NotConfigured names what is missing."""
    global _session
    with _lock:
        if _session is None:
            settings = _settings or _from_environment()
            if settings is None:
                raise NotConfigured(
                    f"{function} is a distributed function, but no cluster is configured: "
                    "call flotta_mqtt.configure(broker=..., storage=...) first, or set "
                    "FLOTTA_BROKER and FLOTTA_STORAGE"
                )
            _session = Session(settings)
        return _session


def _from_environment() -> Settings | None:
    """Settings from a worker's call process, else from FLOTTA_* variables, else None."""
    shipped = os.environ.get("FLOTTA_WORKSPACE_JSON")
    broker = os.environ.get("FLOTTA_BROKER_JSON")
    storage = os.environ.get("FLOTTA_STORAGE_JSON")
    if shipped and broker and storage:
        node = os.environ.get("FLOTTA_NODE", "worker")
        return Settings(
            broker=BrokerSettings.model_validate_json(broker),
            storage=StorageSettings.model_validate_json(storage),
            shipped=Resource.model_validate_json(shipped),
            # Never the worker's own client id: that would take the agent's session over.
            client_id=f"{node}.calls-{uuid.uuid4().hex[:10]}",
        )
    url, store = os.environ.get("FLOTTA_BROKER"), os.environ.get("FLOTTA_STORAGE")
    if not url or not store:
        return None
    folder = os.environ.get("FLOTTA_WORKSPACE")
    return Settings(
        broker=BrokerSettings(url=url),
        storage=StorageSettings(url=store),
        workspace=Path(folder).resolve() if folder else None,
    )


def default_workspace() -> Path:
    """The folder of the main script; the working folder when there is none to speak of.

    A main module run with `-m`, an interactive session, or a script inside the Python
    installation (pytest's, ipython's) says nothing about the project: use the working
    folder then.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path and getattr(main, "__spec__", None) is None:
        folder = Path(path).resolve().parent
        installed = {sys.prefix, sys.base_prefix, *sysconfig.get_paths().values()}
        if not any(folder.is_relative_to(Path(p).resolve()) for p in installed if p):
            return folder
    return Path.cwd().resolve()


def selector(platform: str | Mapping[str, str] | None) -> dict[str, str]:
    """The worker labels a call needs: "*" any, "linux" → platform=linux, "k=v,k2=v2" as said.

    Every call also needs `allow_code=yes`, which a worker's agent sets from its config;
    the python executor is offered only there anyway, and the label makes a binding
    error name the reason.
    """
    labels: dict[str, str] = {}
    if isinstance(platform, Mapping):
        labels = {str(k): str(v) for k, v in platform.items()}
    elif platform and platform.strip() not in ("*", ""):
        for part in platform.split(","):
            key, sep, value = part.strip().partition("=")
            if sep:
                labels[key.strip()] = value.strip()
            else:
                labels["platform"] = key
    return {**labels, "allow_code": "yes"}


@dataclass
class _Batch:
    """The calls of one artifact, by task name, and what has been seen of its status."""

    artifact: Artifact
    calls: dict[str, CallHandle[Any]]
    sent_at: float
    seq: int = -1
    settled: set[str] = field(default_factory=set)


@dataclass
class _Queued:
    handle: CallHandle[Any]
    function: DistributedFunction[Any, Any]
    payload: bytes
    size: int  # estimated bytes in the artifact


class Session:
    """A connection to the cluster for calls: the client, the workspace, two threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ResourceStore(settings.storage.url, settings.storage.options)
        self.client = Client(
            settings.broker, client_id=settings.client_id, storage=settings.storage
        )
        self._archive: Resource | None = settings.shipped
        self._archive_lock = threading.Lock()
        self._pickled: dict[int, tuple[Resource, DistributedFunction[Any, Any]]] = {}
        self._queue: list[_Queued] = []
        self._queued_since = 0.0
        self._wake = threading.Condition()
        self._batches: dict[str, _Batch] = {}
        self._closing = False  # no more calls: the threads end once what was made settles
        self._abandon = False  # end now, settled or not (interpreter exit)
        self._closed = False
        # The largest batch whose status (every job with its product URL) fits a message.
        per_job = 450 + 2 * len(self.store.root)
        self._batch_size = max(1, min(settings.batch_size, STATUS_BYTES // per_job))
        self._submitter = threading.Thread(
            target=self._submit_loop, name="flotta-calls", daemon=True
        )
        self._resolver = threading.Thread(
            target=self._resolve_loop, name="flotta-statuses", daemon=True
        )
        self._submitter.start()
        self._resolver.start()
        atexit.register(self.close)

    # --- the caller's thread --------------------------------------------------------------

    def call(
        self, function: DistributedFunction[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> CallHandle[Any]:
        """Queue one call; the pickling happens here, so its errors reach the caller."""
        self.workspace()
        self._function(function)
        payload = calls.dumps((args, kwargs))
        handle: CallHandle[Any] = CallHandle(self, function.name)
        encoded = 4 * ((len(payload) + 2) // 3)
        inline = encoded if encoded <= calls.INLINE_LIMIT else 0
        # About what the task adds to the artifact's JSON (measured: ~690 bytes for a small
        # call with a 130-character store URL), so a batch stays under the message limit.
        size = 500 + inline + len(self.workspace().url) + 2 * len(function.name)
        with self._wake:
            if self._closing:
                raise RuntimeError("this session is closed: call configure() again")
            if not self._queue:
                self._queued_since = time.monotonic()
            self._queue.append(_Queued(handle, function, payload, size))
            if len(self._queue) == 1 or len(self._queue) >= self._batch_size:
                self._wake.notify_all()  # the submitter lingers on its own otherwise
        return handle

    def workspace(self) -> Resource:
        """The workspace archive in the store: packed at the first call, uploaded if new."""
        if self._archive is not None:
            return self._archive
        with self._archive_lock:
            if self._archive is None:
                folder = self.settings.workspace or default_workspace()
                exclude = []
                if self.store.root.startswith("file://"):
                    exclude.append(Path(self.store.root.removeprefix("file://")))
                packed = workspaces.pack(
                    folder,
                    requirements=self.settings.requirements,
                    ignore=self.settings.ignore,
                    exclude=exclude,
                    max_bytes=self.settings.max_workspace_bytes,
                )
                url = f"{self.store.root}/workspaces/{packed.name}"
                if not self.store.exists(url):
                    self.store.put(url, packed.data, media_type="application/gzip")
                    log.info(
                        "workspace %s uploaded (%d bytes)", packed.sha256[:12], len(packed.data)
                    )
                self._archive = Resource(
                    url=url,
                    sha256=packed.sha256,
                    size=len(packed.data),
                    media_type="application/gzip",
                )
            return self._archive

    def _function(self, function: DistributedFunction[Any, Any]) -> Resource | None:
        """A function the workers cannot import, pickled by value once and stored by hash.

        Pickled at its first call in this session, with the globals it reads as they are
        then: pass what changes as arguments.
        """
        if function.importable:
            return None
        known = self._pickled.get(id(function))
        if known is not None and known[1] is function:
            return known[0]
        data = calls.dumps(function.func)
        sha = hashlib.sha256(data).hexdigest()
        url = f"{self.store.root}/functions/{sha}.pkl"
        if not self.store.exists(url):
            self.store.put(url, data, media_type="application/octet-stream")
        resource = Resource(
            url=url, sha256=sha, size=len(data), media_type="application/octet-stream"
        )
        self._pickled[id(function)] = (resource, function)
        return resource

    def result_file(self, handle: CallHandle[Any]) -> str:
        return f"results/{handle.task}"

    # --- the submitter thread -----------------------------------------------------------------

    def _submit_loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                # Linger briefly for a fuller batch: a caller's loop queues a call in
                # microseconds, so a few milliseconds make one artifact of many calls.
                while not self._closing and self._fits(len(self._queue) + 1):
                    left = self._queued_since + self.settings.linger - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                taken = self._take()
                if self._queue:
                    self._queued_since = time.monotonic()
            try:
                self._flush(taken)
            except Exception as exc:
                log.exception("could not submit %d calls", len(taken))
                for item in taken:
                    item.handle._settle(None, CallFailed(f"the call could not be submitted: {exc}"))

    def _fits(self, count: int) -> bool:
        """Whether the first `count` queued calls fit one artifact (call with the lock)."""
        if count > self._batch_size:
            return False
        return sum(item.size for item in self._queue[:count]) <= BATCH_BYTES

    def _take(self) -> list[_Queued]:
        count = 1
        while count < len(self._queue) and self._fits(count + 1):
            count += 1
        taken, self._queue = self._queue[:count], self._queue[count:]
        return taken

    def _flush(self, taken: list[_Queued]) -> None:
        artifact_id = new_artifact_id()
        archive = self.workspace()
        tasks = []
        by_name: dict[str, CallHandle[Any]] = {}
        for index, item in enumerate(taken):
            function, handle = item.function, item.handle
            name = f"{index:03d}-{_task_label(function.name)}"[:64]
            handle.artifact_id, handle.task = artifact_id, name
            encoded = base64.b64encode(item.payload).decode()
            inputs = []
            call_file = None
            if len(encoded) > calls.INLINE_LIMIT:
                call_file = f"calls/{name}"
                url = self.store.job_file_url(artifact_id, call_file)
                self.store.put(url, item.payload, media_type="application/octet-stream")
                inputs.append(call_file)
            params = calls.CallParams(
                name=function.name,
                workspace=archive,
                function=function.reference() if function.importable else None,
                pickled=self._function(function),
                call=None if call_file else encoded,
                call_file=call_file,
                result_file=self.result_file(handle),
                threads=function.threads,
                timeout=function.timeout,
            )
            tasks.append(
                Task(
                    name=name,
                    executor="python",
                    params=params.model_dump(mode="json", exclude_none=True),
                    inputs=inputs,
                    outputs=[self.result_file(handle)],
                    timeout=function.timeout,
                    retries=function.retries,
                    selector=function.selector,
                )
            )
            by_name[name] = handle
        artifact = Artifact(id=artifact_id, project=PROJECT, steps=[Tasks(tasks=tasks)])
        batch = _Batch(artifact, by_name, sent_at=time.monotonic())
        with self._wake:
            self._batches[artifact_id] = batch
        self.client.submit(artifact)

    # --- the resolver thread ------------------------------------------------------------------

    def _resolve_loop(self) -> None:
        changed = self.client._changed  # notified on every message the client records
        while True:
            with changed:
                if self._abandon or (self._closing and not self._batches and not self._queue):
                    return
                updates = self._updates()
                if not updates:
                    changed.wait(timeout=1.0)
                    updates = self._updates()
            for batch, status, rejected in updates:
                try:
                    self._apply(batch, status, rejected)
                except Exception:
                    log.exception("could not apply the status of %s", batch.artifact.id)
            self._resend()

    def _updates(self) -> list[tuple[_Batch, ArtifactStatus | None, RequestRejected | None]]:
        """Batches whose status moved on or whose submission was rejected (client lock held)."""
        found = []
        for batch in list(self._batches.values()):
            status = self.client._statuses.get(batch.artifact.id)
            rejected = next(
                (r for r in self.client._rejections if r.artifact_id == batch.artifact.id), None
            )
            if rejected is not None or (status is not None and status.seq > batch.seq):
                found.append((batch, status, rejected))
        return found

    def _apply(
        self, batch: _Batch, status: ArtifactStatus | None, rejected: RequestRejected | None
    ) -> None:
        if rejected is not None:
            failure = CallFailed(f"the scheduler rejected the calls: {rejected.error}", "Rejected")
            self._finish(batch, failure)
            return
        assert status is not None
        batch.seq = status.seq
        for summary in status.jobs or []:
            handle = batch.calls.get(summary.name or "")
            if handle is None or summary.name in batch.settled:
                continue
            handle._update(summary)
            if summary.state not in JOB_FINAL:
                continue
            batch.settled.add(summary.name or "")
            failed = summary.state is not JobState.COMPLETED
            handle._settle(
                summary, _failure(handle, summary.state, summary.error, status) if failed else None
            )
        if status.state in ARTIFACT_FINAL:
            # Whatever the listing did not settle (binding failed, no listing) fails now.
            self._finish(batch, None, status)

    def _finish(
        self, batch: _Batch, failure: CallFailed | None, status: ArtifactStatus | None = None
    ) -> None:
        for name, handle in batch.calls.items():
            if name not in batch.settled:
                handle._settle(None, failure or _failure(handle, None, None, status))
        with self.client._changed:
            self._batches.pop(batch.artifact.id, None)
            self.client._statuses.pop(batch.artifact.id, None)  # nothing will read it again
            self.client._rejections[:] = [
                r for r in self.client._rejections if r.artifact_id != batch.artifact.id
            ]
        with self._wake:
            self._wake.notify_all()

    def _resend(self) -> None:
        """Submit again what has no status after a while: the broker may have lost it."""
        now = time.monotonic()
        with self.client._changed:
            silent = [
                b
                for b in self._batches.values()
                if b.seq < 0 and now - b.sent_at > self.client.resend_interval
            ]
        for batch in silent:
            batch.sent_at = now
            self.client.submit(batch.artifact)

    # --- closing -------------------------------------------------------------------------------

    def retire(self) -> None:
        """Take no more calls; disconnect once the calls already made are settled."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        threading.Thread(target=self._close_when_settled, daemon=True).start()

    def _close_when_settled(self) -> None:
        self._submitter.join()
        self._resolver.join()
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Submit what is queued (waiting up to `timeout`), then disconnect."""
        with self._wake:
            if self._closed:
                return
            self._closed = self._closing = True
            self._wake.notify_all()
        self._submitter.join(timeout)
        with self.client._changed:
            self._abandon = True
            self.client._changed.notify_all()
        self._resolver.join(timeout)
        self.client.close()
        atexit.unregister(self.close)


def _failure(
    handle: CallHandle[Any],
    state: JobState | None,
    error: str | None,
    status: ArtifactStatus | None,
) -> CallFailed:
    """Why a call has no outcome, from its job's summary and the artifact's status."""
    remote = status.error if status is not None else None
    if remote is not None and remote.type == "BindingError" and "python executor" in remote.message:
        return CallFailed(
            f"no worker allows shipped code for {handle.function}: no worker the scheduler "
            "knows offers the python executor, which a worker runs only with allow_code: true "
            "in its config (and carries the labels the call's platform asks for). "
            f"Scheduler: {remote.message}",
            "BindingError",
        )
    if state is JobState.FAILED:
        traceback = ""
        summary = handle._summary
        if status is not None and status.error is not None and summary is not None:
            traceback = status.error.traceback if status.failed_job == summary.id else ""
        kind = (error or "").partition(":")[0] or "JobFailed"  # summaries say "Type: message"
        return CallFailed(f"{handle.function} failed on its worker: {error}", kind, traceback)
    if remote is not None:
        what = "cancelled" if state is JobState.CANCELLED else "failed"
        return CallFailed(
            f"{handle.function} {what}: {remote.type}: {remote.message}",
            remote.type,
            remote.traceback,
        )
    return CallFailed(f"{handle.function} ended without an outcome", "Unknown")


def _task_label(name: str) -> str:
    """A function's name as a task name's tail: only the characters task names allow."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.rsplit(".", 1)[-1]) or "call"
