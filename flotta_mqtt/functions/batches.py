"""Batches of calls: how many queued calls go in one artifact, and the artifact they make.

Each call is a task of the `python` executor; an artifact holds as many as fit both its
own message and the status that will list every job with its product.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flotta_mqtt.functions import calls
from flotta_mqtt.functions.handles import CallHandle
from flotta_mqtt.model import Artifact, Task, Tasks
from flotta_mqtt.model.artifact import new_artifact_id

if TYPE_CHECKING:
    from flotta_mqtt.functions.decorator import DistributedFunction
    from flotta_mqtt.functions.uploads import Uploads

PROJECT = "functions"  # the project of call artifacts (they need no worker's data)
BATCH_BYTES = 200 * 1024  # of an artifact's encoded tasks, under the broker's message limit
STATUS_BYTES = 200 * 1024  # of a status listing every job with its product


@dataclass
class QueuedCall:
    """A call made and not yet submitted, with its pickled arguments."""

    handle: CallHandle[Any]
    function: DistributedFunction[Any, Any]
    payload: bytes
    size: int  # estimated bytes in the artifact


@dataclass
class Batch:
    """The calls of one artifact, by task name, and what has been seen of its status."""

    artifact: Artifact
    calls: dict[str, CallHandle[Any]]
    sent_at: float
    seq: int = -1
    settled: set[str] = field(default_factory=set)


def batch_limit(batch_size: int, store_root: str) -> int:
    """The most calls of one artifact whose status (every job with its product URL) fits."""
    per_job = 450 + 2 * len(store_root)
    return max(1, min(batch_size, STATUS_BYTES // per_job))


def task_size(payload: bytes, workspace_url: str, function_name: str) -> int:
    """About what a call's task adds to its artifact's JSON, erring on the large side."""
    encoded = 4 * ((len(payload) + 2) // 3)
    inline = encoded if encoded <= calls.INLINE_LIMIT else 0
    return 500 + inline + len(workspace_url) + 2 * len(function_name)


def fits(queue: list[QueuedCall], count: int, limit: int) -> bool:
    """Whether the first `count` queued calls fit one artifact of at most `limit` calls."""
    if count > limit:
        return False
    return sum(item.size for item in queue[:count]) <= BATCH_BYTES


def take(queue: list[QueuedCall], limit: int) -> tuple[list[QueuedCall], list[QueuedCall]]:
    """The first call and the queued calls placed like it that fit one artifact, and the rest.

    The scheduler binds an artifact as a whole: a call that no worker can run (its labels
    match none) fails the binding of every call beside it. So an artifact holds only calls
    whose functions ask for the same labels, and one that cannot be placed fails alone with
    the calls that ask for what it asks.
    """
    first, taken, rest = queue[0], [queue[0]], []
    size = first.size
    for item in queue[1:]:
        alike = item.function.selector == first.function.selector
        if alike and len(taken) < limit and size + item.size <= BATCH_BYTES:
            taken.append(item)
            size += item.size
        else:
            rest.append(item)
    return taken, rest


def make_batch(taken: list[QueuedCall], uploads: Uploads) -> Batch:
    """One artifact of the calls taken; arguments too large to inline go to the store."""
    artifact_id = new_artifact_id()
    archive = uploads.workspace()
    store = uploads.store
    tasks = []
    by_name: dict[str, CallHandle[Any]] = {}
    for index, item in enumerate(taken):
        function, handle = item.function, item.handle
        name = f"{index:03d}-{_task_label(function.name)}"[:64]
        handle.artifact_id, handle.task = artifact_id, name
        encoded = base64.b64encode(item.payload).decode()
        call_file = None
        if len(encoded) > calls.INLINE_LIMIT:
            url = f"{store.artifact_root(artifact_id)}/calls/{name}"
            call_file = store.put(url, item.payload, media_type="application/octet-stream")
        params = calls.CallParams(
            name=function.name,
            workspace=archive,
            function=function.reference() if function.importable else None,
            pickled=uploads.function(function),
            call=None if call_file else encoded,
            call_file=call_file,
            result_file=calls.result_file(name),
            threads=function.threads,
            timeout=function.timeout,
        )
        tasks.append(
            Task(
                name=name,
                executor="python",
                params=params.model_dump(mode="json", exclude_none=True),
                outputs=[calls.result_file(name)],
                timeout=function.timeout,
                retries=function.retries,
                selector=function.selector,
            )
        )
        by_name[name] = handle
    artifact = Artifact(id=artifact_id, project=PROJECT, steps=[Tasks(tasks=tasks)])
    return Batch(artifact, by_name, sent_at=time.monotonic())


def _task_label(name: str) -> str:
    """A function's name as a task name's tail: only the characters task names allow."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.rsplit(".", 1)[-1]) or "call"
