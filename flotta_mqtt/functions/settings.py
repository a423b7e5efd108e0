"""Where distributed calls go and what they ship: the settings a session starts from.

They come from `configure()` or, failing that, from the environment: `FLOTTA_BROKER`,
`FLOTTA_STORAGE` and optionally `FLOTTA_WORKSPACE` in a caller's process; the worker's own
broker, store and workspace inside a worker's call process (set by the python executor),
so that a distributed function may itself call distributed functions.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path

from flotta_mqtt.functions import workspace as workspaces
from flotta_mqtt.protocol.messages import Resource
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

# Calls per artifact: its status lists every job with its product, and must stay under the
# broker's message size limit up to the scheduler's listing limit of 300 jobs.
BATCH_CALLS = 200
LINGER = 0.005  # seconds a batch waits for more calls after its first


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


def from_environment() -> Settings | None:
    """Settings from a worker's call process, else from FLOTTA_* variables, else None.

    Nested calls inside a worker hold their outer call's slot while they wait: workers need
    `max_jobs` above the outer calls' `threads`, or the outer calls can fill every slot and
    wait forever. On a broker with per-node identities a worker's identity may not submit:
    `FLOTTA_NESTED_BROKER_JSON` (BrokerSettings as JSON) in the worker's environment gives
    its call processes a workbench identity.
    """
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
