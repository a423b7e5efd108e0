"""Operations: what jobs run, registered by name, split into initialize/local/aggregate parts."""

from flotta_mqtt.roles.operations import builtin as _builtin  # noqa: F401  (registers them)
from flotta_mqtt.roles.operations.csvdata import CsvDataset
from flotta_mqtt.roles.operations.registry import (
    REGISTRY,
    Dataset,
    JobContext,
    OperationDef,
    OperationError,
    load_plugins,
    lookup,
    register,
    run,
)

__all__ = [
    "REGISTRY",
    "CsvDataset",
    "Dataset",
    "JobContext",
    "OperationDef",
    "OperationError",
    "load_plugins",
    "lookup",
    "register",
    "run",
]
