"""Cached workflow tasks: a task with `cache` whose run succeeded before, for the same
tenant, with the same definition and the same inputs (by sha256), is not run again; the
outputs of that run are its outputs.

The index is the worker's own record of the runs it made (a table of its journal), not a
file in the shared store, which anyone who may write there could plant. An entry lists
the run's outputs with their sha256s. Reusing it reads each output back, confined to the
folder of the artifact that made it and checked against that sha256, and stores a copy
among the new job's files, so that readers of this artifact stay under its own folder.
A file swapped or removed in the store since fails that check: the entry is dropped, and
the task runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from flotta_mqtt.model import SafeId, Task
from flotta_mqtt.protocol import JobReady, Resource
from flotta_mqtt.transport.store import ResourceError, ResourceStore, sha256_hex

log = logging.getLogger(__name__)

# The media type of a task's product reused from the cache: a status shows the job as
# cached by it (the product also names the run it reuses, under `cached`).
CACHED_PRODUCT = "application/vnd.flotta.cached+json"


class CacheIndex(Protocol):
    """Where a worker keeps its cache entries, by key (its journal)."""

    def cached(self, key: str) -> str | None: ...

    def remember(self, key: str, entry: str) -> None: ...

    def drop(self, key: str) -> None: ...


class CacheEntry(BaseModel):
    """The run whose outputs a key reuses, and those outputs as it stored them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    artifact_id: SafeId
    job_id: int
    attempt: int
    outputs: dict[str, Resource]


def cache_key(scope: str, task: Task, inputs: Mapping[str, str]) -> str:
    """The sha256 of a run's tenant, its task's whole definition and its input job files'
    sha256s by path: two runs with the same key would produce the same outputs."""
    text = json.dumps(
        {"scope": scope, "task": task.model_dump(mode="json"), "inputs": dict(inputs)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return sha256_hex(text.encode())


class TaskCache:
    """Reuse and record cached task runs: the store holds the outputs, `index` the entries."""

    def __init__(self, store: ResourceStore, index: CacheIndex) -> None:
        self.store = store
        self.index = index

    def reuse(self, key: str, job: JobReady) -> dict[str, Any] | None:
        """The product part of a cache hit (`outputs` copied into `job`'s files, `cached`
        naming the run reused), or None to run the task: no entry, or a spoiled one."""
        found = self.index.cached(key)
        if found is None:
            return None
        entry = CacheEntry.model_validate_json(found)
        folder = self.store.artifact_root(entry.artifact_id)
        outputs: dict[str, Resource] = {}
        try:
            for path, resource in entry.outputs.items():
                data = self.store.get(resource, folder)
                url = self.store.job_file_url(job.artifact_id, str(job.job_id), job.attempt, path)
                outputs[path] = self.store.put(url, data, resource.media_type)
        except ResourceError as exc:
            log.warning("a cached run is not reused, the task runs instead: %s", exc)
            self.index.drop(key)
            return None
        # The copy is the entry from now on: the run it came from may be pruned first.
        self.remember(key, job, outputs)
        reused = entry.model_dump(mode="json", include={"artifact_id", "job_id", "attempt"})
        return {
            "outputs": {path: r.model_dump(mode="json") for path, r in outputs.items()},
            "cached": reused,
        }

    def remember(self, key: str, job: JobReady, outputs: Mapping[str, Resource]) -> None:
        """Record a successful run of `job` under `key`."""
        entry = CacheEntry(
            artifact_id=job.artifact_id, job_id=job.job_id, attempt=job.attempt, outputs=outputs
        )
        self.index.remember(key, entry.model_dump_json())
