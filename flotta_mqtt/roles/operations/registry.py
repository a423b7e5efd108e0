"""The operation registry: what a node can run, looked up by the name a step carries."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from flotta_mqtt.model import JobRole, Operation
from flotta_mqtt.protocol import JobReady


class OperationError(Exception):
    """An operation cannot run as asked: unknown name, bad parameters, missing column."""


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dataset:
    """What an operation sees of a worker's local data: rows, streamed, never shipped."""

    def __init__(self, project: str, node: str) -> None:
        self.project = project
        self.node = node

    def columns(self) -> list[str]:
        raise NotImplementedError

    def rows(self) -> Iterator[Mapping[str, Any]]:
        raise NotImplementedError

    def require(self, columns: set[str]) -> None:
        """Fail with a clear error naming the node and column when one is missing."""
        missing = sorted(columns - set(self.columns()))
        if missing:
            raise OperationError(
                f"worker {self.node}: project {self.project} has no column "
                f"{', '.join(missing)} (columns: {', '.join(self.columns())})"
            )


@dataclass
class JobContext:
    """Everything a job's operation may use on the node that runs it."""

    job: JobReady
    node: str
    inputs: list[Any]  # the products of the jobs it consumes, in job order
    data: Dataset | None  # the node's data for the project; None on the initiator
    # Set when the scheduler cancels this attempt: a long operation should check it.
    cancelled: threading.Event = field(default_factory=threading.Event)

    def dataset(self) -> Dataset:
        if self.data is None:
            raise OperationError(
                f"{self.job.operation.name} needs local data, but node {self.node} "
                f"holds none for project {self.job.project}"
            )
        return self.data


class OperationDef:
    """An operation: three parts, one per job role. Subclasses register with @register."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams

    def initialize(self, params: Any, ctx: JobContext) -> Any:
        raise OperationError(f"{self.name} cannot run on the initiator at the start of a step")

    def local(self, params: Any, ctx: JobContext) -> Any:
        raise OperationError(f"{self.name} cannot run on a worker")

    def aggregate(self, params: Any, ctx: JobContext) -> Any:
        raise OperationError(f"{self.name} cannot aggregate on the initiator")


_REGISTRY: dict[str, OperationDef] = {}
REGISTRY: Mapping[str, OperationDef] = MappingProxyType(_REGISTRY)


def register(cls: type[OperationDef]) -> type[OperationDef]:
    """Class decorator: make an operation runnable by name on this node."""
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"an operation named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls()
    return cls


def load_plugins(modules: list[str]) -> None:
    """Import modules that register more operations (a worker's `plugins` setting)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise OperationError(f"cannot load operations plugin {module!r}: {exc}") from exc


def lookup(operation: Operation) -> tuple[OperationDef, BaseModel]:
    """The registered operation and its validated parameters, or a specific OperationError."""
    definition = _REGISTRY.get(operation.name)
    if definition is None:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise OperationError(f"unknown operation {operation.name!r} (registered: {known})")
    try:
        params = definition.Params.model_validate(operation.params)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise OperationError(f"invalid parameters for {operation.name}: {problems}") from None
    return definition, params


def run(ctx: JobContext) -> Any:
    """Run the part of the job's operation that its role calls for; return the product."""
    definition, params = lookup(ctx.job.operation)
    part: Callable[[Any, JobContext], Any] = {
        JobRole.INITIALIZE: definition.initialize,
        JobRole.LOCAL: definition.local,
        JobRole.AGGREGATE: definition.aggregate,
    }[ctx.job.role]
    return part(params, ctx)
