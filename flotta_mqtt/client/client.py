"""The workbench SDK: submit artifacts, follow their retained status, fetch their results."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from flotta_mqtt.model import ARTIFACT_FINAL, Artifact, ArtifactState, JobState
from flotta_mqtt.protocol import (
    ArtifactStatus,
    CancelArtifact,
    NodePresence,
    ProtocolError,
    PruneReport,
    PruneRequest,
    RemoteError,
    RequestRejected,
    StatusRequest,
    decode,
    topics,
)
from flotta_mqtt.protocol.messages import Reply
from flotta_mqtt.protocol.schedules import ScheduleReport
from flotta_mqtt.protocol.topics import Channel
from flotta_mqtt.transport import open_bus
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.transport.store import ResourceStore

if TYPE_CHECKING:
    from flotta_mqtt.client.graph import Engine, GraphImage

log = logging.getLogger(__name__)


class ArtifactFailed(RuntimeError):
    """The artifact failed or was cancelled; carries the remote error and its traceback."""

    def __init__(self, status: ArtifactStatus) -> None:
        self.status = status
        self.remote: RemoteError = status.error or RemoteError(type="Unknown", message="")
        where = f" in job {status.failed_job}" if status.failed_job is not None else ""
        super().__init__(
            f"artifact {status.artifact_id} {status.state}{where}: "
            f"{self.remote.type}: {self.remote.message}\n"
            f"--- remote traceback ---\n{self.remote.traceback}"
        )


class NoSuchArtifact(LookupError):
    """The scheduler never saw this artifact id: nothing will ever be reported about it."""

    def __init__(self, rejection: RequestRejected) -> None:
        self.artifact_id = rejection.artifact_id
        super().__init__(rejection.error)


class Client:
    """A connection to the broker as a workbench. Use as a context manager or `close()` it."""

    def __init__(
        self,
        broker: BrokerSettings | str = "mqtt://127.0.0.1:1883",
        *,
        client_id: str | None = None,
        storage: StorageSettings | None = None,
        resend_interval: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        settings = BrokerSettings(url=broker) if isinstance(broker, str) else broker
        # With broker identities, the ACL lets a workbench use only topics named after its
        # username, so that is its name on the bus unless told otherwise.
        self.client_id = client_id or settings.username or f"workbench-{uuid.uuid4().hex[:12]}"
        self.storage = storage or StorageSettings()
        self.resend_interval = resend_interval
        self._changed = threading.Condition()
        self._statuses: dict[str, ArtifactStatus] = {}
        self._rejections: list[RequestRejected] = []
        self._answers: list[Reply | ScheduleReport] = []  # to prune and schedule requests
        self._asking = threading.Lock()  # one such request at a time
        self._asked = (topics.prune(self.client_id), topics.schedule(self.client_id))
        self._presence: dict[str, NodePresence] = {}
        self._barriers: dict[str, threading.Event] = {}
        self.bus = open_bus(
            self.client_id,
            settings,
            self._message,
            [topics.reply(self.client_id), topics.ALL_PRESENCE],
            on_failure=lambda error: self.wake(),  # wait_for raises it
            clean=True,
        )
        self.bus.start(wait=connect_timeout)

    def close(self) -> None:
        self.bus.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- requests ------------------------------------------------------------------------

    def submit(self, artifact: Artifact) -> ArtifactHandle:
        """Submit an artifact and return at once with a handle to follow it."""
        with self._changed:  # e.g. "no such artifact" from a lookup before it existed
            self._rejections[:] = [r for r in self._rejections if r.artifact_id != artifact.id]
        handle = self.handle(artifact.id)
        handle._artifact = artifact
        self.bus.publish(topics.submit(self.client_id), artifact)
        return handle

    def handle(self, artifact_id: str) -> ArtifactHandle:
        """A handle on an artifact submitted before, by this workbench or (where the
        broker's ACL lets it read theirs) another."""
        self.bus.subscribe(topics.status("+", artifact_id))
        return ArtifactHandle(self, artifact_id)

    def lookup(self, artifact_id: str, timeout: float = 5.0) -> ArtifactHandle:
        """A handle on an artifact the scheduler knows, with its status at hand.

        Asks the scheduler, which answers with the status or, for an id it never saw,
        a rejection: NoSuchArtifact then, TimeoutError if nothing answers in `timeout` s.
        """
        handle = self.handle(artifact_id)
        self.bus.publish(topics.ask(self.client_id), StatusRequest(artifact_id=artifact_id))

        def answered() -> bool:
            return self.status_of(artifact_id) is not None or handle.refused() is not None

        if not self.wait_for(answered, timeout):
            raise TimeoutError(f"no status of artifact {artifact_id} in {timeout} s")
        handle.check()
        return handle

    def cancel(self, artifact_id: str, reason: str = "cancelled by the workbench") -> None:
        self.bus.publish(
            topics.cancel(self.client_id), CancelArtifact(artifact_id=artifact_id, reason=reason)
        )

    def prune(self, older_than: float, timeout: float = 10.0) -> PruneReport:
        """Have the scheduler remove every artifact finished more than `older_than` seconds
        ago (database rows, store objects, retained status); what it removed.

        PermissionError if this client is not one of the scheduler's admins; TimeoutError
        if no answer came in `timeout` s (a large prune goes on meanwhile).
        """
        request = PruneRequest(older_than=older_than)
        report = self.ask(topics.prune(self.client_id), request, timeout)
        assert isinstance(report, PruneReport)  # one request at a time: the answer to it
        return report

    def ask(
        self, topic: str, request: BaseModel, timeout: float = 10.0
    ) -> PruneReport | ScheduleReport:
        """Publish a request the scheduler answers on the reply topic (a prune, a schedule
        request); its report. PermissionError or ValueError if it refused the request,
        naming why; TimeoutError if no answer came in `timeout` s."""
        what = topic.rsplit("/", 1)[1]
        with self._asking:
            with self._changed:
                self._answers.clear()  # a late answer to an earlier request is not this one's
            self.bus.publish(topic, request)
            if not self.wait_for(lambda: bool(self._answers), timeout):
                raise TimeoutError(f"no answer to the {what} request in {timeout} s")
            with self._changed:
                answer = self._answers.pop(0)
        if not isinstance(answer, RequestRejected):
            return answer
        if answer.reason == "forbidden":
            raise PermissionError(answer.error)
        raise ValueError(f"the scheduler rejected the {what} request: {answer.error}")

    def workers(self, timeout: float = 5.0) -> list[NodePresence]:
        """The nodes whose retained presence the broker holds, online or not."""
        self.sync(timeout)
        with self._changed:
            return sorted(self._presence.values(), key=lambda p: p.node)

    def statuses(self, timeout: float = 5.0) -> dict[str, ArtifactStatus]:
        """Every artifact status the broker retains (and keeps them current from now on)."""
        self.bus.subscribe(topics.ALL_STATUS)
        self.sync(timeout)
        with self._changed:
            return dict(self._statuses)

    # --- what the client recorded, for code built on it -------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until `predicate()` is true or `timeout` s pass; return its last value.

        It is evaluated now, after every message the client records and after `wake()`,
        with the records locked, so it may read them through `status_of` and `rejection_of`.
        Raises IdentityInUse once the bus gave up (another process took the identity over).
        """
        with self._changed:
            self._changed.wait_for(lambda: self.bus.failure is not None or predicate(), timeout)
            if self.bus.failure is not None:
                raise self.bus.failure
            return predicate()

    def wake(self) -> None:
        """Have every `wait_for` evaluate its predicate again (its own state changed)."""
        with self._changed:
            self._changed.notify_all()

    def status_of(self, artifact_id: str) -> ArtifactStatus | None:
        """The latest status recorded of an artifact followed (see `handle`), if any."""
        with self._changed:
            return self._statuses.get(artifact_id)

    def rejection_of(self, artifact_id: str) -> RequestRejected | None:
        """The first rejection recorded that names this artifact, if any."""
        with self._changed:
            return next((r for r in self._rejections if r.artifact_id == artifact_id), None)

    def forget(self, artifact_id: str) -> None:
        """Drop the status and rejections recorded of an artifact nobody will ask about."""
        with self._changed:
            self._statuses.pop(artifact_id, None)
            self._rejections[:] = [r for r in self._rejections if r.artifact_id != artifact_id]

    def sync(self, timeout: float = 5.0) -> None:
        """Wait until the broker has delivered what it held when we subscribed.

        The broker keeps per-subscriber order, so once a marker we publish to ourselves
        comes back, every retained message sent before it has arrived too.
        """
        marker = uuid.uuid4().hex
        event = self._barriers[marker] = threading.Event()
        self.bus.publish(topics.reply(self.client_id), RequestRejected(topic="sync", error=marker))
        if not event.wait(timeout):
            raise TimeoutError(f"no answer from the broker in {timeout} s")
        del self._barriers[marker]

    # --- incoming (network thread: record and notify only) ---------------------------------

    def _message(self, topic: str, payload: bytes) -> None:
        if not payload:  # an emptied retained message: the status of a pruned artifact
            self._cleared(topic)
            return
        try:
            address, message = decode(topic, payload)
        except ProtocolError as exc:
            log.error("workbench %s rejected a message: %s", self.client_id, exc)
            return
        with self._changed:
            if address.channel is Channel.STATUS:
                known = self._statuses.get(message.artifact_id)
                if known is None or message.seq > known.seq:
                    self._statuses[message.artifact_id] = message
            elif address.channel is Channel.PRESENCE:
                self._presence[message.node] = message
            elif address.channel is Channel.REPLY:
                barrier = None
                if isinstance(message, RequestRejected) and message.topic == "sync":
                    barrier = self._barriers.get(message.error)
                if barrier is not None:
                    barrier.set()
                elif not isinstance(message, RequestRejected) or message.topic in self._asked:
                    self._answers.append(message)  # a report, or the refusal of a request
                elif message.artifact_id is not None:
                    self._rejections.append(message)
                else:  # its other requests all name their artifact: not one of ours
                    log.error(
                        "workbench %s: the scheduler rejected a request naming no "
                        "artifact on %s: %s",
                        self.client_id,
                        message.topic,
                        message.error,
                    )
            self._changed.notify_all()

    def _cleared(self, topic: str) -> None:
        """Forget the status of an artifact whose retained status was cleared."""
        try:
            address = topics.parse(topic)
        except topics.TopicError:
            address = None
        if address is None or address.channel is not Channel.STATUS:
            log.error("workbench %s rejected a message: empty, on %s", self.client_id, topic)
            return
        with self._changed:
            self._statuses.pop(address.name, None)
            self._changed.notify_all()


class ArtifactHandle:
    """Follows one artifact through its retained status topic; nothing polls."""

    def __init__(self, client: Client, artifact_id: str) -> None:
        self.client = client
        self.artifact_id = artifact_id
        self._artifact: Artifact | None = None

    def status(self) -> ArtifactStatus | None:
        """The latest status seen, or None if none has arrived yet."""
        return self.client.status_of(self.artifact_id)

    def fetch_status(self, timeout: float = 5.0) -> ArtifactStatus | None:
        """The current status as the broker retains it, or None if it holds none."""
        self.client.sync(timeout)
        return self.status()

    def next_status(
        self, after_seq: int = -1, timeout: float | None = None
    ) -> ArtifactStatus | None:
        """The first status newer than `after_seq`, waiting up to `timeout` s; None if none came.

        Statuses only move forwards (`seq`), so a watcher passes the last seq it showed.
        """

        def newer() -> bool:
            status = self.client.status_of(self.artifact_id)
            return status is not None and status.seq > after_seq

        if self.client.wait_for(newer, timeout=timeout):
            return self.client.status_of(self.artifact_id)
        return None

    def graph(self, timeout: float = 5.0, engine: Engine = "auto") -> GraphImage:
        """A picture of the artifact's DAG, each job coloured by state, as the broker has it.

        In a notebook it displays inline; `.save("dag.svg")` (or .png, .dot, .mmd) writes it.
        Raises GraphTooLarge for artifacts whose status lists no jobs (over 300 jobs, or
        not bound yet), and LookupError when the broker holds no status for it.
        """
        from flotta_mqtt.client.graph import GraphImage, JobDag

        status = self.fetch_status(timeout)
        if status is None:
            raise LookupError(f"no status for artifact {self.artifact_id}")
        return GraphImage(JobDag.from_status(status), engine)

    def wait(self, timeout: float | None = None, progress: bool = False) -> ArtifactStatus:
        """Block until the artifact is completed, failed or cancelled; return its status.

        A submission the broker lost (it acknowledges before persisting) is re-sent until
        the scheduler's first status arrives; the scheduler ignores duplicates.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _ProgressBar(self.artifact_id) if progress else None
        try:
            while True:
                step = self.client.resend_interval
                if deadline is not None:
                    step = min(step, max(0.0, deadline - time.monotonic()))
                self.client.wait_for(self._settled, timeout=step)
                status = self.client.status_of(self.artifact_id)
                self.check()
                if bar is not None and status is not None:
                    bar.update(status)
                if status is not None and status.state in ARTIFACT_FINAL:
                    return status
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"artifact {self.artifact_id} not finished after {timeout} s "
                        f"(state: {status.state if status else 'no status yet'})"
                    )
                if status is None and self._artifact is not None:
                    self.client.bus.publish(topics.submit(self.client.client_id), self._artifact)
        finally:
            if bar is not None:
                bar.close()

    def refused(self) -> RequestRejected | None:
        """The scheduler's rejection of a request about this artifact, if one came."""
        return self.client.rejection_of(self.artifact_id)

    def check(self) -> None:
        """Raise what a rejection recorded says: NoSuchArtifact, or ValueError."""
        rejected = self.refused()
        if rejected is None:
            return
        if rejected.reason == "unknown_artifact":
            raise NoSuchArtifact(rejected)
        raise ValueError(f"the scheduler rejected the request: {rejected.error}")

    def _settled(self) -> bool:
        """Whether waiting can stop: a final status, or a rejection of the submission."""
        status = self.client.status_of(self.artifact_id)
        return self.refused() is not None or (status is not None and status.state in ARTIFACT_FINAL)

    def result(self, timeout: float | None = None) -> Any:
        """The final product, loaded; raises ArtifactFailed with the remote error on failure.

        With one final job this is its product; with several, the list of their products.
        """
        status = self.wait(timeout)
        if status.state is not ArtifactState.COMPLETED:
            raise ArtifactFailed(status)
        if not status.results:
            raise PermissionError(
                f"artifact {self.artifact_id} completed, but its status carries no results: "
                "its scheduler does not allow downloading them (allow_download is off), or "
                "could not store their list (see its log)"
            )
        store = ResourceStore.of(self.client.storage)
        folder = store.artifact_root(self.artifact_id)
        results = store.results(status.results, self.artifact_id)
        products = [json.loads(store.get(r, folder)) for r in results]
        return products[0] if len(products) == 1 else products

    def download(self, path: Path | str, timeout: float | None = None) -> Path:
        """Write the result as a JSON document to `path`."""
        target = Path(path)
        target.write_text(json.dumps(self.result(timeout), indent=2) + "\n")
        return target

    def cancel(self) -> None:
        self.client.cancel(self.artifact_id)


class _ProgressBar:
    """A live rich progress bar of jobs done out of total."""

    def __init__(self, artifact_id: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task(f"artifact {artifact_id[:12]}", total=None)
        self._progress.start()

    def update(self, status: ArtifactStatus) -> None:
        done = status.counts.get(JobState.COMPLETED, 0)
        self._progress.update(
            self._task,
            total=status.total or None,
            completed=done,
            description=f"artifact {status.artifact_id[:12]} {status.state}",
        )

    def close(self) -> None:
        self._progress.stop()
