"""Test-only operations, loaded by workers as `--plugin tests.plugins.test_ops`.

- `boom`: its local part raises ValueError("boom: <message>") from `_explode`, so a test
  can find the function in the remote traceback.
- `slow`: waits for the file `flag` to exist (or sleeps `seconds`) — the sleep is the
  workload, not synchronisation — then adds 1 per local job to what it consumes.
- `once`: its local part appends `<node> <artifact> <job>` to the file `ledger` and adds 1
  to what it consumes; initialize and aggregate pass the sum on. A chain of them therefore
  produces exactly the number of local jobs run, so a job counted twice shows in the result.

A subprocess worker imports this module as `tests.plugins.test_ops` (PYTHONPATH = repo
root). pytest may also import the file under another name while collecting (its name
matches `test_*.py`); `_register` keeps one registration per operation either way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from flotta_mqtt.analytics import (
    REGISTRY,
    JobContext,
    OperationDef,
    OperationError,
    register,
)


def _register(cls: type[OperationDef]) -> type[OperationDef]:
    """`register`, tolerating this very module imported a second time under another name."""
    known = type(REGISTRY[cls.name]) if cls.name in REGISTRY else None
    if known is not None and (known.__qualname__, known.__module__.rsplit(".", 2)[-2:]) == (
        cls.__qualname__,
        ["plugins", "test_ops"],
    ):
        return cls  # the same operation, from this file imported under its other name
    return register(cls)


def _numbers(inputs: list[Any]) -> float:
    return sum(x for x in inputs if isinstance(x, int | float))


class BoomParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = "it blew up"


def _explode(message: str) -> None:
    raise ValueError(f"boom: {message}")


@_register
class Boom(OperationDef):
    name: ClassVar[str] = "boom"
    Params = BoomParams

    def local(self, params: BoomParams, ctx: JobContext) -> Any:
        _explode(params.message)


class SlowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flag: str | None = None  # wait until this file exists
    seconds: float = Field(default=0.0, ge=0)  # or simply take this long
    timeout: float = Field(default=60.0, gt=0)  # give up waiting for the flag after this


def _take_time(params: SlowParams, ctx: JobContext) -> None:
    """The workload: sleep, or wait for the flag; stop early when the job is cancelled."""
    if params.flag is None:
        if ctx.cancelled.wait(params.seconds):
            raise OperationError("slow: cancelled")
        return
    deadline = time.monotonic() + params.timeout
    flag = Path(params.flag)
    while not flag.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"slow: flag {flag} not set after {params.timeout} s")
        if ctx.cancelled.wait(0.01):
            raise OperationError("slow: cancelled")


@_register
class Slow(OperationDef):
    name: ClassVar[str] = "slow"
    Params = SlowParams

    def initialize(self, params: SlowParams, ctx: JobContext) -> Any:
        _take_time(params, ctx)
        return _numbers(ctx.inputs)

    def local(self, params: SlowParams, ctx: JobContext) -> Any:
        _take_time(params, ctx)
        return 1 + _numbers(ctx.inputs)

    def aggregate(self, params: SlowParams, ctx: JobContext) -> Any:
        _take_time(params, ctx)
        return _numbers(ctx.inputs)


class OnceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ledger: str
    seconds: float = Field(default=0.0, ge=0)  # how long each local job takes


@_register
class Once(OperationDef):
    name: ClassVar[str] = "once"
    Params = OnceParams

    def initialize(self, params: OnceParams, ctx: JobContext) -> Any:
        return _numbers(ctx.inputs)

    def local(self, params: OnceParams, ctx: JobContext) -> Any:
        time.sleep(params.seconds)
        # One short O_APPEND write per job: atomic between the worker processes sharing it.
        with open(params.ledger, "a") as ledger:
            ledger.write(f"{ctx.node} {ctx.job.artifact_id} {ctx.job.job_id}\n")
        return 1 + _numbers(ctx.inputs)

    def aggregate(self, params: OnceParams, ctx: JobContext) -> Any:
        return _numbers(ctx.inputs)


# --- lifecycle tests (tests/integration/test_lifecycle.py) ---------------------------------
#
# - `flaky`: appends `<monotonic time> <node> <job> <attempt>` to the file `counter` and
#   raises FlakyError while that file has at most `failures` lines, so a retried job fails
#   its first attempts and then succeeds; the timestamps show the retry backoff. An attempt
#   that succeeds waits for the file `flag` first, if one is named.
# - `linger`: appends `<node> <artifact> <job> <attempt>` to `ledger` when an attempt starts,
#   then lingers (sleeps `seconds`, or until the file `flag` exists), and appends the same
#   line to `marker` when it sees `ctx.cancelled` — proof the cancellation reached it. Only
#   attempts up to `attempts`, on the `nodes` named (all if None), linger; a cancelled one
#   raises OperationError unless `quiet`.
# Both add 1 per local job to what they consume, like `slow`.


class FlakyError(RuntimeError):
    """What `flaky` raises on its planned failures."""


class FlakyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    counter: str
    failures: int = Field(default=1, ge=0)
    flag: str | None = None
    timeout: float = Field(default=60.0, gt=0)


def _flaky(params: FlakyParams, ctx: JobContext) -> None:
    counter = Path(params.counter)
    mine = f"{time.monotonic()!r} {ctx.node} {ctx.job.job_id} {ctx.job.attempt}"
    with counter.open("a") as lines:
        lines.write(mine + "\n")
    # Its place among the calls, not the lines there now: two calls appending at once
    # would otherwise both count past the planned failures.
    count = counter.read_text().splitlines().index(mine) + 1
    if count <= params.failures:
        raise FlakyError(f"flaky: failure {count} of {params.failures}")
    if params.flag is not None:
        _take_time(SlowParams(flag=params.flag, timeout=params.timeout), ctx)


@_register
class Flaky(OperationDef):
    name: ClassVar[str] = "flaky"
    Params = FlakyParams

    def initialize(self, params: FlakyParams, ctx: JobContext) -> Any:
        _flaky(params, ctx)
        return _numbers(ctx.inputs)

    def local(self, params: FlakyParams, ctx: JobContext) -> Any:
        _flaky(params, ctx)
        return 1 + _numbers(ctx.inputs)

    def aggregate(self, params: FlakyParams, ctx: JobContext) -> Any:
        _flaky(params, ctx)
        return _numbers(ctx.inputs)


class LingerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ledger: str | None = None
    marker: str | None = None
    seconds: float = Field(default=60.0, ge=0)
    flag: str | None = None
    nodes: list[str] | None = None
    attempts: int = Field(default=1_000_000, ge=0)
    # Return quietly when cancelled instead of raising: no traceback is formatted on the
    # worker's thread (on Python 3.11, formatting one parses source with `ast`, which is
    # not thread-safe: it can break pytest rendering a failure at the same moment).
    quiet: bool = False


def _note(path: str | None, ctx: JobContext) -> None:
    if path is not None:
        with open(path, "a") as lines:
            lines.write(f"{ctx.node} {ctx.job.artifact_id} {ctx.job.job_id} {ctx.job.attempt}\n")


def _linger(params: LingerParams, ctx: JobContext) -> None:
    _note(params.ledger, ctx)
    if ctx.job.attempt > params.attempts or (
        params.nodes is not None and ctx.node not in params.nodes
    ):
        return
    deadline = time.monotonic() + params.seconds
    while params.flag is None or not Path(params.flag).exists():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if ctx.cancelled.wait(left if params.flag is None else min(left, 0.01)):
            _note(params.marker, ctx)
            if params.quiet:
                return
            raise OperationError("linger: cancelled")


@_register
class Linger(OperationDef):
    name: ClassVar[str] = "linger"
    Params = LingerParams

    def initialize(self, params: LingerParams, ctx: JobContext) -> Any:
        _linger(params, ctx)
        return _numbers(ctx.inputs)

    def local(self, params: LingerParams, ctx: JobContext) -> Any:
        _linger(params, ctx)
        return 1 + _numbers(ctx.inputs)

    def aggregate(self, params: LingerParams, ctx: JobContext) -> Any:
        _linger(params, ctx)
        return _numbers(ctx.inputs)
