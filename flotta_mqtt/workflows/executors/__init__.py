"""Executors of workflow tasks, registered by name, chosen per worker by its config."""

from flotta_mqtt.workflows.executors import api as _api  # noqa: F401  (registers it)
from flotta_mqtt.workflows.executors import docker as _docker  # noqa: F401  (registers it)
from flotta_mqtt.workflows.executors import kube as _kube  # noqa: F401  (registers it)
from flotta_mqtt.workflows.executors import shell as _shell  # noqa: F401  (registers it)
from flotta_mqtt.workflows.executors.base import (
    EXECUTORS,
    Executor,
    Site,
    TaskError,
    TaskResult,
    TaskRun,
    check_task,
    make_executor,
    register_executor,
)
from flotta_mqtt.workflows.executors.policy import PolicyError, SitePolicy
from flotta_mqtt.workflows.executors.runner import TaskRunner

__all__ = [
    "EXECUTORS",
    "Executor",
    "PolicyError",
    "Site",
    "SitePolicy",
    "TaskError",
    "TaskResult",
    "TaskRun",
    "TaskRunner",
    "check_task",
    "make_executor",
    "register_executor",
]
