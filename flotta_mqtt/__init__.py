"""flotta_mqtt: distributed jobs over MQTT, run by edge workers next to their data.

The public surface for workbenches: build an Artifact from steps, submit it with a Client.
"""

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
from flotta_mqtt.roles.config import BrokerSettings, StorageSettings
from flotta_mqtt.roles.workbench.client import ArtifactFailed, ArtifactHandle, Client

__all__ = [
    "AllOf",
    "AnyOf",
    "Artifact",
    "ArtifactFailed",
    "ArtifactHandle",
    "ArtifactState",
    "BindingError",
    "BrokerSettings",
    "Client",
    "Collect",
    "Compare",
    "Distribute",
    "Finalize",
    "Initialize",
    "Iterate",
    "JobState",
    "Not",
    "Operation",
    "Pairwise",
    "Parallel",
    "RoundRobin",
    "SchedulerContext",
    "Sequential",
    "StorageSettings",
    "bind",
]
