"""Test helpers shared by the suites: bounded waiting, without sleeps as synchronisation.

Importable as `from helpers import MessageRecorder, wait_for` (pytest puts `tests/` on
sys.path for the rootdir conftest); `wait_for` is also a fixture in conftest.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from flotta_mqtt.model import JobRole, Operation, Task
from flotta_mqtt.protocol import JobReady, Resource, decode, unbatch

Messages = list[tuple[str, bytes]]


def decoded(messages: Messages) -> list[tuple[str, Any]]:
    """Each message decoded, with the topic it came on; a JobBatch's or EventBatch's
    messages one by one, since nodes batch whatever is ready at the same time."""
    return [
        (topic, message)
        for topic, payload in messages
        for message in unbatch(decode(topic, payload)[1])
    ]


def messages_of(
    messages: Messages, kind: type[Any], keep: Callable[[Any], bool] = lambda m: True
) -> list[Any]:
    """The decoded messages of one type, in arrival order (batches unpacked)."""
    return [m for _, m in decoded(messages) if isinstance(m, kind) and keep(m)]


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    message: str = "condition not met",
    interval: float = 0.01,
) -> None:
    """Poll `predicate` every `interval` s until it is truthy; fail the test after `timeout`.

    The one allowed polling primitive, for state nothing signals (a process, a flag that is
    only ever cleared). Prefer a threading.Event or MessageRecorder where there is one.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{message} (waited {timeout} s)")
        time.sleep(interval)


class MessageRecorder:
    """A bus handler `(topic, payload)` that records every message and lets a test wait.

    Waiting uses a threading.Condition notified on each message, so a test wakes as soon
    as what it waits for has arrived.
    """

    def __init__(self) -> None:
        self._messages: Messages = []
        self._changed = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._changed:
            self._messages.append((topic, payload))
            self._changed.notify_all()

    @property
    def messages(self) -> Messages:
        """A snapshot of what was received so far, in arrival order."""
        with self._changed:
            return list(self._messages)

    @property
    def payloads(self) -> list[bytes]:
        return [payload for _, payload in self.messages]

    def wait_for(
        self,
        predicate: Callable[[Messages], object],
        timeout: float = 10.0,
        message: str = "the expected messages did not arrive",
    ) -> Messages:
        """Block until `predicate(messages)` is truthy and return the messages; fail on timeout."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(list(self._messages)), timeout):
                pytest.fail(f"{message} in {timeout} s; got {len(self._messages)}: {self._tail()}")
            return list(self._messages)

    def wait(self, count: int, timeout: float = 10.0) -> Messages:
        """Block until at least `count` messages arrived and return them all."""
        return self.wait_for(lambda msgs: len(msgs) >= count, timeout, f"expected {count} messages")

    def _tail(self) -> str:
        return repr(self._messages[-3:])[:500]


def job_ready(
    job_id: int = 0,
    attempt: int = 1,
    artifact_id: str = "art1",
    project: str = "p",
    kind: str = "steps",
    operation: Operation | None = None,
    inputs: Sequence[Resource] = (),
) -> JobReady:
    """A JobReady as a scheduler would send it (a `noop` step's job unless told otherwise)."""
    return JobReady(
        inputs=list(inputs),
        artifact_id=artifact_id,
        job_id=job_id,
        attempt=attempt,
        project=project,
        seed=0,
        step="0",
        kind=kind,
        role=JobRole.LOCAL,
        iteration=0,
        operation=operation or Operation(name="noop"),
    )


def task_job(
    task: Task, artifact_id: str = "art1", project: str = "p", inputs: Sequence[Resource] = ()
) -> JobReady:
    """The JobReady a scheduler would send for a workflow task: job 0, attempt 1, consuming
    the products `inputs` of the tasks it depends on."""
    operation = Operation(name="task", params=task.model_dump(mode="json"))
    return job_ready(
        artifact_id=artifact_id, project=project, kind="tasks", operation=operation, inputs=inputs
    )
