"""Executors run workflow tasks; a worker runs only the executors its config names."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from flotta_mqtt.model import Task


@dataclass
class TaskRun:
    """What a task is given: its definition, a private working folder, a stop signal."""

    task: Task
    workdir: Path  # holds the task's input job files; its outputs are collected from here
    env: dict[str, str]
    cancelled: threading.Event
    label: str  # artifact/task/attempt, for names of containers or Kubernetes jobs


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
    """Runs one task to completion, honouring its timeout and the stop signal."""

    name: str

    def run(self, run: TaskRun) -> TaskResult:
        raise NotImplementedError


_FACTORIES: dict[str, Callable[[], Executor]] = {}
EXECUTORS: Mapping[str, Callable[[], Executor]] = MappingProxyType(_FACTORIES)


def register_executor(name: str, factory: Callable[[], Executor]) -> None:
    _FACTORIES[name] = factory


def make_executor(name: str) -> Executor:
    """An executor by name; a clear error naming the choices when it is unknown."""
    try:
        return _FACTORIES[name]()
    except KeyError:
        known = ", ".join(sorted(_FACTORIES))
        raise ValueError(f"unknown executor {name!r} (known: {known})") from None
