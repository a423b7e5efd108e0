"""What calls ship through the store: the workspace archive and functions pickled by value.

Each is stored once, named by its sha256, and uploaded only if the store lacks it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flotta_mqtt.functions import calls
from flotta_mqtt.functions import workspace as workspaces
from flotta_mqtt.functions.settings import Settings, default_workspace
from flotta_mqtt.protocol.messages import Resource
from flotta_mqtt.transport.store import ResourceStore

if TYPE_CHECKING:
    from flotta_mqtt.functions.decorator import DistributedFunction

log = logging.getLogger(__name__)


class Uploads:
    """A session's shipped files: its workspace archive and its functions pickled by value."""

    def __init__(self, settings: Settings, store: ResourceStore) -> None:
        self.settings = settings
        self.store = store
        self._archive: Resource | None = settings.shipped
        self._archive_lock = threading.Lock()
        self._pickled: dict[int, tuple[Resource, DistributedFunction[Any, Any]]] = {}

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

    def function(self, function: DistributedFunction[Any, Any]) -> Resource | None:
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
