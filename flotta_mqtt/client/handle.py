"""Following one artifact: its handle, and the errors its outcome raises."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flotta_mqtt.client.progress import ProgressBar
from flotta_mqtt.model import ARTIFACT_FINAL, Artifact, ArtifactState
from flotta_mqtt.protocol import ArtifactStatus, RemoteError, RequestRejected, topics
from flotta_mqtt.transport.store import ResourceStore

if TYPE_CHECKING:
    from flotta_mqtt.client.client import Client
    from flotta_mqtt.client.graph import Engine, GraphImage


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


class ArtifactHandle:
    """Follows one artifact through its retained status topic; nothing polls."""

    def __init__(self, client: Client, artifact_id: str, group: str | None = None) -> None:
        self.client = client
        self.artifact_id = artifact_id
        self.group = group  # the scheduler group it was submitted to (None: the default)
        self._artifact: Artifact | None = None

    def resubmit(self) -> None:
        """Send the submission (again: the scheduler ignores duplicates)."""
        assert self._artifact is not None, "only a handle from submit() can resubmit"
        topic = self.client.request_topic(topics.submit(self.client.client_id), self.group)
        self.client.bus.publish(topic, self._artifact)

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
        bar = ProgressBar(self.artifact_id) if progress else None
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
                    self.resubmit()
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
        store = ResourceStore.of(self.client.storage, self.group)
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
        self.client.cancel(self.artifact_id, group=self.group)
