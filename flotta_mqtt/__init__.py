"""flotta_mqtt: distributed jobs over MQTT, run by edge workers next to their data.

The public surface for workbenches: build an Artifact from steps, submit it with a Client.
"""

from flotta_mqtt.client.client import ArtifactFailed, ArtifactHandle, Client
from flotta_mqtt.functions import (
    CallFailed,
    CallHandle,
    NotConfigured,
    RemoteError,
    as_completed,
    configure,
    distributed,
    gather,
)
from flotta_mqtt.model import (
    AllOf,
    AnyOf,
    Artifact,
    ArtifactState,
    BindingError,
    Collect,
    Compare,
    Distribute,
    Finalize,
    Initialize,
    Iterate,
    JobState,
    Not,
    Operation,
    Pairwise,
    Parallel,
    RoundRobin,
    SchedulerContext,
    Sequential,
    bind,
)
from flotta_mqtt.model.query import DateCompare, IsIn, Query
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings

__all__ = [
    "AllOf",
    "AnyOf",
    "Artifact",
    "ArtifactFailed",
    "ArtifactHandle",
    "ArtifactState",
    "BindingError",
    "BrokerSettings",
    "CallFailed",
    "CallHandle",
    "Client",
    "Collect",
    "Compare",
    "DateCompare",
    "Distribute",
    "Finalize",
    "Initialize",
    "IsIn",
    "Iterate",
    "JobState",
    "Not",
    "NotConfigured",
    "Operation",
    "Pairwise",
    "Parallel",
    "Query",
    "RemoteError",
    "RoundRobin",
    "SchedulerContext",
    "Sequential",
    "StorageSettings",
    "as_completed",
    "bind",
    "configure",
    "distributed",
    "gather",
]
