"""The caller's side of distributed functions: one session per process, and its two threads.

The session starts at the first call, from `configure()` or else from the environment
(see `settings`). A submitter thread takes the calls the caller's loop queued and sends
them as one artifact once a batch is full or `linger` seconds after its first call; a
resolver thread follows the artifacts' retained statuses and settles the handles.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from flotta_mqtt.client.client import Client
from flotta_mqtt.functions import batches, calls, statuses
from flotta_mqtt.functions import workspace as workspaces
from flotta_mqtt.functions.batches import Batch, QueuedCall
from flotta_mqtt.functions.handles import CallFailed, CallHandle
from flotta_mqtt.functions.settings import (
    BATCH_CALLS,
    LINGER,
    NotConfigured,
    Settings,
    from_environment,
)
from flotta_mqtt.functions.uploads import Uploads
from flotta_mqtt.protocol.messages import ArtifactStatus, RequestRejected, Resource
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import ResourceStore

if TYPE_CHECKING:
    from flotta_mqtt.functions.decorator import DistributedFunction

log = logging.getLogger(__name__)

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
            settings = _settings or from_environment()
            if settings is None:
                raise NotConfigured(
                    f"{function} is a distributed function, but no cluster is configured: "
                    "call flotta_mqtt.configure(broker=..., storage=...) first, or set "
                    "FLOTTA_BROKER and FLOTTA_STORAGE"
                )
            _session = Session(settings)
        return _session


_Update: TypeAlias = tuple[Batch, ArtifactStatus | None, RequestRejected | None]


class Session:
    """A connection to the cluster for calls: the client, the uploads, two threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ResourceStore.of(settings.storage, settings.broker.group)
        self.uploads = Uploads(settings, self.store)
        self.client = Client(
            settings.broker, client_id=settings.client_id, storage=settings.storage
        )
        self._queue: list[QueuedCall] = []
        self._queued_since = 0.0
        self._wake = threading.Condition()
        self._batches: dict[str, Batch] = {}
        self._closing = False  # no more calls: the threads end once what was made settles
        self._abandon = False  # end now, settled or not (interpreter exit)
        self._closed = False
        self._batch_limit = batches.batch_limit(settings.batch_size, self.store.root)
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
        archive = self.uploads.workspace()
        self.uploads.function(function)
        payload = calls.dumps((args, kwargs))
        handle: CallHandle[Any] = CallHandle(self, function.name)
        size = batches.task_size(payload, archive.url, function.name)
        with self._wake:
            if self._closing:
                raise RuntimeError("this session is closed: call configure() again")
            if not self._queue:
                self._queued_since = time.monotonic()
            self._queue.append(QueuedCall(handle, function, payload, size))
            if len(self._queue) == 1 or len(self._queue) >= self._batch_limit:
                self._wake.notify_all()  # the submitter lingers on its own otherwise
        return handle

    def workspace(self) -> Resource:
        """The workspace archive in the store: packed at the first call, uploaded if new."""
        return self.uploads.workspace()

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
                while not self._closing and batches.fits(
                    self._queue, len(self._queue) + 1, self._batch_limit
                ):
                    left = self._queued_since + self.settings.linger - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                taken, self._queue = batches.take(self._queue, self._batch_limit)
                if self._queue:
                    self._queued_since = time.monotonic()
            try:
                self._submit(taken)
            except Exception as exc:
                log.exception("could not submit %d calls", len(taken))
                for item in taken:
                    item.handle.settle(None, CallFailed(f"the call could not be submitted: {exc}"))

    def _submit(self, taken: list[QueuedCall]) -> None:
        batch = batches.make_batch(taken, self.uploads)
        with self._wake:
            self._batches[batch.artifact.id] = batch
        self.client.submit(batch.artifact)

    # --- the resolver thread ------------------------------------------------------------------

    def _resolve_loop(self) -> None:
        updates: list[_Update] = []

        def news() -> bool:
            if self._resolved():
                return True
            updates[:] = self._updates()
            return bool(updates)

        while True:
            # Evaluated at every message the client records; the timeout lets `_resend`
            # look at silent batches now and then.
            self.client.wait_for(news, timeout=1.0)
            if self._resolved():
                return
            for batch, status, rejected in updates:
                try:
                    self._apply(batch, status, rejected)
                except Exception:
                    log.exception("could not apply the status of %s", batch.artifact.id)
            self._resend()

    def _resolved(self) -> bool:
        """Whether the resolver may end: abandoned, or closing with every call settled."""
        return self._abandon or (self._closing and not self._batches and not self._queue)

    def _updates(self) -> list[_Update]:
        """Batches whose status moved on or whose submission was rejected."""
        found = []
        for batch in list(self._batches.values()):
            status = self.client.status_of(batch.artifact.id)
            rejected = self.client.rejection_of(batch.artifact.id)
            if rejected is not None or (status is not None and status.seq > batch.seq):
                found.append((batch, status, rejected))
        return found

    def _apply(
        self, batch: Batch, status: ArtifactStatus | None, rejected: RequestRejected | None
    ) -> None:
        if rejected is not None:
            failure = CallFailed(f"the scheduler rejected the calls: {rejected.error}", "Rejected")
            self._finish(batch, failure)
            return
        assert status is not None
        if statuses.apply_status(batch, status):
            # Whatever the listing did not settle (binding failed, no listing) fails now.
            self._finish(batch, None, status)

    def _finish(
        self, batch: Batch, failure: CallFailed | None, status: ArtifactStatus | None = None
    ) -> None:
        statuses.settle_rest(batch, failure, status)
        with self._wake:
            self._batches.pop(batch.artifact.id, None)
            self._wake.notify_all()
        self.client.forget(batch.artifact.id)  # nothing will read it again

    def _resend(self) -> None:
        """Submit again what has no status after a while: the broker may have lost it."""
        now = time.monotonic()
        with self._wake:
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
        self._abandon = True
        self.client.wake()
        self._resolver.join(timeout)
        self.client.close()
        atexit.unregister(self.close)
