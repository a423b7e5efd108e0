"""Operations: what jobs run, registered by name, split into initialize/local/aggregate parts."""

# Imported for their @register side effect: the operations every node offers.
from flotta_mqtt.analytics import builtin as _builtin  # noqa: F401
from flotta_mqtt.analytics import forest as _forest  # noqa: F401
from flotta_mqtt.analytics import groups as _groups  # noqa: F401
from flotta_mqtt.analytics import linear as _linear  # noqa: F401
from flotta_mqtt.analytics import statistics as _statistics  # noqa: F401
from flotta_mqtt.analytics import summary as _summary  # noqa: F401
from flotta_mqtt.analytics.datasets import DatasetSpec, FileDataset, open_dataset
from flotta_mqtt.analytics.policy import PrivacyPolicy
from flotta_mqtt.analytics.registry import (
    DEFAULT_MIN_GROUP_SIZE,
    REGISTRY,
    Budget,
    BudgetExceeded,
    ColumnTypeError,
    Dataset,
    JobContext,
    OperationDef,
    OperationError,
    PrivacyRefused,
    TooFewRows,
    UnknownColumn,
    load_plugins,
    lookup,
    register,
    run,
)
from flotta_mqtt.analytics.secagg import rounds as _secagg  # noqa: F401

__all__ = [
    "DEFAULT_MIN_GROUP_SIZE",
    "REGISTRY",
    "Budget",
    "BudgetExceeded",
    "ColumnTypeError",
    "Dataset",
    "DatasetSpec",
    "FileDataset",
    "JobContext",
    "OperationDef",
    "OperationError",
    "PrivacyPolicy",
    "PrivacyRefused",
    "TooFewRows",
    "UnknownColumn",
    "load_plugins",
    "lookup",
    "open_dataset",
    "register",
    "run",
]
