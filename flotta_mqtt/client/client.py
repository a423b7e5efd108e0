"""The workbench SDK: submit artifacts, follow their retained status, fetch their results."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from types import TracebackType

from pydantic import BaseModel

from flotta_mqtt.client.handle import ArtifactFailed, ArtifactHandle, NoSuchArtifact
from flotta_mqtt.model import Artifact
from flotta_mqtt.protocol import (
    ArtifactStatus,
    CancelArtifact,
    DirectoryEntry,
    NodePresence,
    ProtocolError,
    PruneReport,
    PruneRequest,
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

__all__ = ["ArtifactFailed", "ArtifactHandle", "Client", "NoSuchArtifact"]

log = logging.getLogger(__name__)


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
        self.group = settings.group  # None: each artifact's group is its project's
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
        self._directory: dict[str, DirectoryEntry] = {}  # project → the group serving it
        self._looked_up: set[str] = set()  # projects whose directory entry we follow
        self._groups: set[str | None] = {self.group}  # namespaces whose replies we read
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
        """Submit an artifact to the group serving its project (`group_of`) and return at
        once with a handle to follow it."""
        with self._changed:  # e.g. "no such artifact" from a lookup before it existed
            self._rejections[:] = [r for r in self._rejections if r.artifact_id != artifact.id]
        handle = self.handle(artifact.id, self.group_of(artifact.project))
        handle._artifact = artifact
        handle.resubmit()
        return handle

    def handle(self, artifact_id: str, group: str | None = None) -> ArtifactHandle:
        """A handle on an artifact submitted before (to `group`), by this workbench or
        (where the broker's ACL lets it read theirs) another."""
        group = self.group if group is None else group
        self.bus.subscribe(topics.to_group(topics.status("+", artifact_id), group))
        return ArtifactHandle(self, artifact_id, group)

    def group_of(self, project: str | None, timeout: float = 5.0) -> str | None:
        """The scheduler group serving `project`: this client's group if it has one, else
        the one the directory names (retained), else None (the default group)."""
        if self.group is not None or project is None:
            return self.group
        if project not in self._looked_up:
            self.bus.subscribe(topics.directory(project))
            self.sync(timeout)  # the retained entry, if any, has arrived
            self._looked_up.add(project)
        with self._changed:
            entry = self._directory.get(project)
        return entry.group if entry is not None else None

    def request_topic(self, topic: str, group: str | None) -> str:
        """A request topic in `group`'s namespace; the answers there are read from now on."""
        if group not in self._groups:
            self._groups.add(group)
            self.bus.subscribe(topics.to_group(topics.reply(self.client_id), group))
        return topics.to_group(topic, group)

    def lookup(
        self, artifact_id: str, timeout: float = 5.0, group: str | None = None
    ) -> ArtifactHandle:
        """A handle on an artifact the scheduler (of `group`) knows, with its status at hand.

        Asks the scheduler, which answers with the status or, for an id it never saw,
        a rejection: NoSuchArtifact then, TimeoutError if nothing answers in `timeout` s.
        """
        handle = self.handle(artifact_id, group)
        ask = self.request_topic(topics.ask(self.client_id), group)
        self.bus.publish(ask, StatusRequest(artifact_id=artifact_id))

        def answered() -> bool:
            return self.status_of(artifact_id) is not None or handle.refused() is not None

        if not self.wait_for(answered, timeout):
            raise TimeoutError(f"no status of artifact {artifact_id} in {timeout} s")
        handle.check()
        return handle

    def cancel(
        self, artifact_id: str, reason: str = "cancelled by the workbench", group: str | None = None
    ) -> None:
        topic = self.request_topic(topics.cancel(self.client_id), group)
        self.bus.publish(topic, CancelArtifact(artifact_id=artifact_id, reason=reason))

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
        what = topics.parse(topic).channel.value
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
            elif address.channel is Channel.DIRECTORY and message.project == address.name:
                self._directory[message.project] = message
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
        """Forget the status of an artifact, or the directory entry of a project, whose
        retained message was cleared."""
        try:
            address = topics.parse(topic)
        except topics.TopicError:
            address = None
        if address is None or address.channel not in (Channel.STATUS, Channel.DIRECTORY):
            log.error("workbench %s rejected a message: empty, on %s", self.client_id, topic)
            return
        with self._changed:
            records = self._statuses if address.channel is Channel.STATUS else self._directory
            records.pop(address.name, None)
            self._changed.notify_all()
