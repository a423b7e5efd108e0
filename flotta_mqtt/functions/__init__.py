"""Distributed functions: `@distributed` calls run on workers, with the caller's workspace.

The third front-end on the same engine: each call is a task of the `python` executor in
an artifact of up to 200 calls; the caller's project folder travels as one archive named
by its sha256; handles settle from the artifacts' retained statuses.
"""

from flotta_mqtt.functions.decorator import DistributedFunction, distributed
from flotta_mqtt.functions.handles import (
    CallFailed,
    CallHandle,
    RemoteError,
    as_completed,
    gather,
)
from flotta_mqtt.functions.session import configure, shutdown
from flotta_mqtt.functions.settings import NotConfigured

__all__ = [
    "CallFailed",
    "CallHandle",
    "DistributedFunction",
    "NotConfigured",
    "RemoteError",
    "as_completed",
    "configure",
    "distributed",
    "gather",
    "shutdown",
]
