"""The operation registry: what a node can run, looked up by the name a step carries."""

from __future__ import annotations

import importlib
import logging
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from flotta_mqtt.analytics.plan import Groups, Request, answer
from flotta_mqtt.analytics.policy import PrivacyPolicy
from flotta_mqtt.model import JobRole, Operation
from flotta_mqtt.model.errors import describe
from flotta_mqtt.protocol import JobReady

log = logging.getLogger(__name__)


class OperationError(Exception):
    """An operation cannot run as asked: unknown name, bad parameters, missing column."""


class UnknownColumn(OperationError):
    """An operation names a column the worker's data does not have."""


class ColumnTypeError(OperationError):
    """A column's type does not fit its use, e.g. a string column compared with a number."""


class TooFewRows(OperationError):
    """A worker refuses to release an aggregate of fewer rows than its project allows."""


class OperationFailed(OperationError):
    """A built-in operation broke on the data; its own message stays in the site's log."""


class PrivacyRefused(OperationError):
    """The site's policy does not allow what a job asks (an exact answer, a release)."""


class BudgetExceeded(PrivacyRefused):
    """A job would spend more of a dataset's privacy budget than is left."""


class Budget:
    """Where a site records the privacy it spends: its worker's journal keeps the ledger."""

    def spend(self, project: str, epsilon: float, delta: float, policy: PrivacyPolicy) -> None:
        """Record this job's spend (once, however often it runs) or raise BudgetExceeded."""
        raise PrivacyRefused("this node keeps no privacy ledger, so it answers no noised query")


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Below this many rows a worker releases no aggregate, unless its project config says
# otherwise; zero rows may be released, as in DataSHIELD's `nfilter.tab` rule.
DEFAULT_MIN_GROUP_SIZE = 5


class Dataset:
    """What an operation sees of a worker's local data: column batches, streamed, never shipped.

    Subclasses provide `schema`, `batches` and `count_rows`; the rest is shared policy.
    """

    def __init__(
        self,
        project: str,
        node: str,
        min_group_size: int = DEFAULT_MIN_GROUP_SIZE,
        privacy: PrivacyPolicy | None = None,
    ) -> None:
        self.project = project
        self.node = node
        self.min_group_size = min_group_size
        self.privacy = privacy if privacy is not None else PrivacyPolicy()
        # The values each declared column takes (categories.py): set by a source once it
        # has checked them against its schema.
        self.categories: dict[str, tuple[Any, ...]] = {}

    def schema(self) -> pa.Schema:
        """Column names and types, known without reading the data."""
        raise NotImplementedError

    def batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        """The named columns (at least one), in batches of rows, in file order."""
        raise NotImplementedError

    def count_rows(self) -> int:
        raise NotImplementedError

    def start(self, folder: Path | None) -> None:
        """Begin what makes later jobs faster, keeping its files in `folder` (in the
        worker's state; None: the worker keeps none): a file dataset's copy (copies.py)."""

    def close(self) -> None:
        """Stop what `start` began."""

    def aggregate(self, requests: Sequence[Request]) -> list[Groups]:
        """Answer a job's requests in one pass; sources that the engine reads in place (or
        a database) override this to scan there rather than stream their batches."""
        from flotta_mqtt.analytics import engine  # it compiles with filters, which need us

        used = set().union(*(r.columns() for r in requests))
        self.require(used)
        columns = sorted(used) or self.schema().names[:1]
        schema = pa.schema([self.schema().field(c) for c in columns])
        who = f"worker {self.node}: project {self.project}"
        failed: list[OperationError] = []

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                yield from self.batches(columns)
            except OperationError as exc:  # worded for the analyst: passed on as it is
                failed.append(exc)
                raise

        try:
            return answer(
                requests,
                lambda s: engine.scan_batches(batches(), s, schema, who, self.categories),
            )
        except engine.EngineError as exc:
            if failed:
                raise failed[0] from None
            raise OperationFailed(f"{who}: the engine failed reading its data ({exc})") from None

    def describe(self) -> dict[str, Any]:
        """The schema and policy a worker announces in its presence: never any of the data
        (the row count is an exact count, so only where the site answers exactly; declared
        categories are the site's public values)."""
        described: dict[str, Any] = {
            "columns": [{"name": f.name, "type": str(f.type)} for f in self.schema()],
            **(
                {"categories": {c: list(v) for c, v in self.categories.items()}}
                if self.categories
                else {}
            ),
            "min_group_size": self.min_group_size,
            "privacy": self.privacy.describe(),
        }
        if self.privacy.exact:
            described["rows"] = self.count_rows()
        return described

    def require(self, columns: set[str]) -> None:
        """Fail with a clear error naming the node and column when one is missing."""
        names = self.schema().names
        missing = sorted(columns - set(names))
        if missing:
            raise UnknownColumn(
                f"worker {self.node}: project {self.project} has no column "
                f"{', '.join(missing)} (columns: {', '.join(names)})"
            )

    def release(self, rows: int) -> None:
        """Refuse an exact aggregate of 1 to min_group_size - 1 rows.

        The message is the same whatever the group: naming it (`site=rare`) or its size
        would put values of the data in the error.
        """
        if 0 < rows < self.min_group_size:
            raise TooFewRows(
                f"worker {self.node}: project {self.project}: a group is below the site's "
                "minimum size; the worker releases no aggregate"
            )


@dataclass
class JobContext:
    """Everything a job's operation may use on the node that runs it."""

    job: JobReady
    node: str
    inputs: list[Any]  # the products of the jobs it consumes, in job order
    data: Dataset | None  # the node's data for the project; None on the initiator
    budget: Budget = field(default_factory=Budget)  # where noised answers are paid for
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
    # Whether each part takes microseconds and touches nothing outside the process (no
    # data, no budget, no I/O): a worker may then run it on its agent thread.
    instant: ClassVar[bool] = False

    def initialize(self, params: Any, ctx: JobContext) -> Any:
        raise OperationError(f"{self.name} cannot run on the initiator at the start of a step")

    def local(self, params: Any, ctx: JobContext) -> Any:
        raise OperationError(f"{self.name} cannot run on a worker")

    def aggregate(self, params: Any, ctx: JobContext) -> Any:
        raise OperationError(f"{self.name} cannot aggregate on the initiator")

    def iterable(self, role: JobRole) -> bool:
        """Whether this role's part accepts the previous round's product among its inputs
        (what round r + 1 of an `Iterate` consumes); checked at submission."""
        return True


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
        problems = describe(exc, "params")
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
    try:
        return part(params, ctx)
    except OperationError:
        raise  # worded to carry no value of the data
    except Exception as exc:
        if not type(definition).__module__.startswith("flotta_mqtt."):
            raise  # a plugin: the site's own code, which words its own errors
        # numpy's, pyarrow's or scikit-learn's message may quote a value of the data: the
        # log keeps where it was raised, and its type.
        where = "".join(traceback.format_tb(exc.__traceback__))
        log.error("worker %s: %s raised %s at\n%s", ctx.node, definition.name, type(exc), where)
        raise OperationFailed(
            f"worker {ctx.node}: {definition.name} failed with {type(exc).__name__} "
            "(the message is in the worker's log)"
        ) from None
