"""Steps: each a complete, self-contained instruction for the nodes that run its jobs."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from flotta_mqtt.model.distribution import Arity, Distribution
from flotta_mqtt.model.errors import BindingError
from flotta_mqtt.model.operation import Operation
from flotta_mqtt.model.workflow import Task, task_graph


class JobRole(StrEnum):
    """Which part of its operation a job runs; fixed by the step and the job's place in it."""

    INITIALIZE = "initialize"  # on the initiator, with no data: start a resource
    LOCAL = "local"  # on a worker, with its local data and the products it consumes
    AGGREGATE = "aggregate"  # on the initiator: combine the products it consumes


class SecureRound(StrEnum):
    """The operation each round of a secure aggregation runs (analytics/secagg)."""

    KEYS = "secagg.keys"  # a site advertises its public keys
    SHARE = "secagg.share"  # it deals shares of its seeds, sealed to each site
    MASK = "secagg.mask"  # it sends its masked input
    REVEAL = "secagg.reveal"  # it reveals the shares that unmask the survivors' sum
    UNMASK = "secagg.unmask"  # the initiator unmasks the sum


class _Step(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    distribution: Distribution | None = None


class _OperationStep(_Step):
    operation: Operation
    # Seconds one attempt of a job may run before it is stopped and counted as failed.
    timeout: float | None = Field(default=None, gt=0)
    # How many more attempts a failed job gets (with jittered exponential backoff).
    retries: int = Field(default=0, ge=0, le=100)

    def __init__(
        self,
        operation: Operation | None = None,
        distribution: Distribution | None = None,
        /,
        **data: Any,
    ) -> None:
        # Positional form `Parallel(op, Collect())` reads like the notation of the docs.
        if operation is not None:
            data["operation"] = operation
        if distribution is not None:
            data["distribution"] = distribution
        super().__init__(**data)


class Initialize(_OperationStep):
    """One job on the initiator, before the workers start (setup, a first model...)."""

    kind: Literal["initialize"] = "initialize"


def _count_or_fraction(value: object) -> object:
    """1 would read as a fraction (all sites): a count below 2 is refused, not guessed at."""
    if isinstance(value, int) and not isinstance(value, bool) and value < 2:
        raise ValueError("a threshold is a count of at least 2 sites, or a fraction in (0.5, 1]")
    return value


# How many sites must take part to the end of a secure aggregation: a count (>= 2), or a
# fraction (> 1/2) of the sites that advertised keys.
Threshold = Annotated[
    Annotated[int, Field(ge=2)] | Annotated[float, Field(gt=0.5, le=1)],
    BeforeValidator(_count_or_fraction),
]


class SecureAggregation(BaseModel):
    """Sum the workers' products so that the initiator learns the sum, never a site's part.

    A secure `Parallel` binds as rounds of jobs (analytics/secagg): each site advertises
    keys, deals seed shares to the others, sends its masked input, then reveals what
    unmasks the sum; the initiator's last job unmasks it. A site that does not finish a
    round within `dropout` seconds of its dispatch drops out, and the round goes on
    without it; with fewer than `threshold` sites left the round fails.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Of a site's neighbourhood (itself and its neighbours); None: a strict majority of it.
    threshold: Threshold | None = None
    # Sites each site shares with and masks against (SecAgg+'s sparse graph, rounded down
    # to an even number); None: every other site (SecAgg).
    neighbours: int | None = Field(default=None, ge=2, le=100_000)
    dropout: float = Field(default=30.0, gt=0, le=86_400)


class Parallel(_OperationStep):
    """One job per worker, each on its own local data; `secure` sums them securely."""

    kind: Literal["parallel"] = "parallel"
    secure: SecureAggregation | None = None

    @model_serializer(mode="wrap")
    def _unset_secure_unsaid(self, handler: SerializerFunctionWrapHandler) -> Any:
        """A plain Parallel is written as it was before `secure`: not a byte longer."""
        data = handler(self)
        if self.secure is None and isinstance(data, dict):
            data.pop("secure", None)
        return data


class Sequential(_OperationStep):
    """Initiator → worker 1 → … → worker N → initiator, each updating the product it receives.

    The first job runs the operation's initialize part, the workers its local part, and the
    last job its aggregate part; no worker sees another's contribution except through it.
    """

    kind: Literal["sequential"] = "sequential"

    @property
    def masked(self) -> bool:
        """Whether the operation runs masked (its `masked` parameter): the running value
        then travels sealed from hop to hop, so binding adds a round of advertised keys."""
        return self.operation.params.get("masked") is True


class Finalize(_OperationStep):
    """One job on the initiator, combining what it consumes (aggregation, teardown)."""

    kind: Literal["finalize"] = "finalize"


class Tasks(_Step):
    """A workflow's task graph: one job per task (per replica), on a worker able to run it.

    Its jobs are locked by the tasks' own dependencies; they hold no data, so a task whose
    worker is lost moves to another, and a failed task stops only its descendants.
    """

    kind: Literal["tasks"] = "tasks"
    tasks: list[Task] = Field(min_length=1)

    @model_validator(mode="after")
    def _is_a_dag(self) -> Tasks:
        task_graph(self.tasks)
        return self


class Iterate(_Step):
    """Repeat a block of steps; each round waits for the previous round's last jobs.

    Rounds are joined by the block's last step's distribution, or by a barrier (every
    last job of round r unlocks every first job of round r + 1) when it has none. The
    Iterate's own distribution joins the final round to the step after it.
    """

    kind: Literal["iterate"] = "iterate"
    rounds: int = Field(ge=1, le=100_000)
    steps: list[Step] = Field(min_length=1)

    def __init__(
        self, rounds: int | None = None, steps: list[Step] | None = None, /, **data: Any
    ) -> None:
        if rounds is not None:
            data["rounds"] = rounds
        if steps is not None:
            data["steps"] = steps
        super().__init__(**data)


Step = Annotated[
    Initialize | Parallel | Sequential | Finalize | Tasks | Iterate, Field(discriminator="kind")
]
Iterate.model_rebuild()


def entry_arity(step: Step) -> Arity:
    """How many jobs a step starts with: one (initiator) or one per worker."""
    if isinstance(step, Iterate):
        return entry_arity(step.steps[0])
    if isinstance(step, Tasks):
        roots = [task for task in step.tasks if not task.depends]
        return Arity.ONE if sum(task.replicas for task in roots) == 1 else Arity.MANY
    return Arity.MANY if isinstance(step, Parallel) else Arity.ONE


def exit_arity(step: Step) -> Arity:
    """How many jobs a step ends with: one (initiator) or one per worker."""
    if isinstance(step, Iterate):
        return exit_arity(step.steps[-1])
    if isinstance(step, Tasks):
        needed = {dep for task in step.tasks for dep in task.depends}
        leaves = [task for task in step.tasks if task.name not in needed]
        return Arity.ONE if sum(task.replicas for task in leaves) == 1 else Arity.MANY
    if isinstance(step, Parallel) and step.secure is None:
        return Arity.MANY
    return Arity.ONE  # a secure Parallel ends with the initiator's unmasking job


def check_steps(steps: list[Step], prefix: str = "") -> None:
    """Raise BindingError for any distribution that cannot join the steps it sits between.

    The check needs no context, so a bad artifact is refused at submission whatever
    workers happen to be there (a Collect into a Parallel step is wrong even with one).
    """
    for i, step in enumerate(steps):
        label = f"step {prefix}{i} ({step.kind})"
        if isinstance(step, Iterate):
            check_steps(step.steps, prefix=f"{prefix}{i}.")
            last = step.steps[-1]
            if last.distribution is not None:
                _check_join(last.distribution, last, step.steps[0], f"the rounds of {label}")
        if step.distribution is None:
            continue
        if i + 1 == len(steps):
            if not prefix:
                raise BindingError(
                    f"{label} has a {type(step.distribution).__name__} distribution "
                    "but no step follows it"
                )
            continue  # the last step of an Iterate block: checked above, between rounds
        nxt = steps[i + 1]
        _check_join(step.distribution, step, nxt, f"{label} → step {prefix}{i + 1} ({nxt.kind})")


def _check_join(distribution: Distribution, before: Step, after: Step, where: str) -> None:
    reason = distribution.check(exit_arity(before), entry_arity(after))
    if reason is not None:
        raise BindingError(
            f"{where}: {reason}, but the jobs are {exit_arity(before)} → {entry_arity(after)}"
        )
