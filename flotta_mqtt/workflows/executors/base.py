"""Executors run workflow tasks; a worker runs only the executors its config names."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from flotta_mqtt.model import Task
from flotta_mqtt.model.errors import describe
from flotta_mqtt.model.run import RunParams, needs
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.workflows.executors.policy import SitePolicy


@dataclass(frozen=True)
class Site:
    """What a node may hand its executors: who it is, its broker and store, where it keeps
    state, and whether it runs code shipped by callers."""

    node: str
    broker: BrokerSettings
    storage: StorageSettings
    state_dir: Path | None
    allow_code: bool


@dataclass
class TaskRun:
    """What a task is given: its definition, a private working folder, a stop signal, the
    values of the secrets it names, and the policy of the site it runs on."""

    task: Task
    workdir: Path  # holds the task's input job files; its outputs are collected from here
    env: dict[str, str]
    cancelled: threading.Event
    label: str  # artifact/task/attempt, for names of containers or Kubernetes jobs
    secrets: dict[str, str] = field(default_factory=dict)  # name → value, never logged
    policy: SitePolicy = field(default_factory=SitePolicy)


@dataclass
class TaskResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class TaskError(Exception):
    """A task that ran and failed: carries its exit code for the status."""

    def __init__(self, message: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Executor:
    """Runs one task to completion, honouring its timeout and the stop signal.

    A node calls `setup` once before the first run and `close` once when it stops; by
    default both do nothing, for executors that need nothing of the node.
    """

    name: str

    def provides(self, policy: SitePolicy) -> frozenset[str]:
        """What the `run` tasks it runs on a site with `policy` may have besides a
        container (a Requirement: gpu, network); nothing by default."""
        return frozenset()

    def setup(self, site: Site) -> None:
        """Take what the executor needs of the node it runs on."""

    def run(self, run: TaskRun) -> TaskResult:
        raise NotImplementedError

    def close(self) -> None:
        """Release what `setup` or the runs acquired (processes, folders)."""


_Params = TypeVar("_Params", bound=BaseModel)
_FACTORIES: dict[str, Callable[[], Executor]] = {}
# Executors defined by other parts, imported (and so registered) when first named.
_PROVIDERS = {"python": "flotta_mqtt.functions.executor"}
_PARAMS: dict[str, type[BaseModel]] = {}
EXECUTORS: Mapping[str, Callable[[], Executor]] = MappingProxyType(_FACTORIES)


def register_executor(
    name: str, factory: Callable[[], Executor], params: type[BaseModel] | None = None
) -> None:
    """Make an executor available by name; `params` lets a task be checked before it runs."""
    _FACTORIES[name] = factory
    if params is not None:
        _PARAMS[name] = params


def check_task(task: Task) -> None:
    """Refuse a task whose params its executor would refuse, before anything runs."""
    if task.executor == "run":
        needs(task, _params(task, RunParams, "run"))
        return
    _provide(task.executor)
    model = _PARAMS.get(task.executor)
    if model is not None:
        _params(task, model, task.executor)


def _params(task: Task, model: type[_Params], kind: str) -> _Params:
    try:
        return model.model_validate(task.params)
    except ValidationError as exc:
        problems = describe(exc, "params")
        raise ValueError(f"task {task.name}: invalid {kind} params: {problems}") from None


def make_executor(name: str) -> Executor:
    """An executor by name; a clear error naming the choices when it is unknown."""
    _provide(name)
    try:
        return _FACTORIES[name]()
    except KeyError:
        known = ", ".join(sorted(_FACTORIES))
        raise ValueError(f"unknown executor {name!r} (known: {known})") from None


def _provide(name: str) -> None:
    """Import the module that registers executor `name`, if another part provides it."""
    if name not in _FACTORIES and name in _PROVIDERS:
        importlib.import_module(_PROVIDERS[name])
