"""Operations for the fault tests, loaded by node processes as `--plugin tests.faults.fault_ops`.

- `faults.gated`: its local part appends `<node> <artifact> <job> start` to the file
  `ledger`, waits for the file `flag` to exist (if given), appends `... end`, and adds 1 to
  what it consumes; initialize and aggregate pass the sum on. Parallel → Collect →
  Finalize of it therefore yields the number of workers, and the ledger shows every run
  of every job, including one cut short by a crash (a `start` without its `end`).

Why not `slow` and `once` from tests/plugins/test_ops.py: the tests need both at once —
a job held running until the test says so (to fault the node mid-job) and a trace of
every execution (to show a job ran once, or exactly how many times).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from flotta_mqtt.analytics import JobContext, OperationDef, OperationError, register


class GatedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ledger: str
    flag: str | None = None  # the local part waits until this file exists
    timeout: float = Field(default=90.0, gt=0)  # give up waiting for the flag after this


def _numbers(inputs: list[Any]) -> float:
    return sum(x for x in inputs if isinstance(x, int | float))


def _write(ledger: str, ctx: JobContext, what: str) -> None:
    # One short O_APPEND write per line: atomic between the processes sharing the file.
    with open(ledger, "a") as out:
        out.write(f"{ctx.node} {ctx.job.artifact_id} {ctx.job.job_id} {what}\n")


@register
class Gated(OperationDef):
    name: ClassVar[str] = "faults.gated"
    Params = GatedParams

    def initialize(self, params: GatedParams, ctx: JobContext) -> Any:
        return _numbers(ctx.inputs)

    def local(self, params: GatedParams, ctx: JobContext) -> Any:
        _write(params.ledger, ctx, "start")
        if params.flag is not None:
            flag = Path(params.flag)
            deadline = time.monotonic() + params.timeout
            while not flag.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"faults.gated: flag {flag} not set in {params.timeout} s")
                if ctx.cancelled.wait(0.01):
                    raise OperationError("faults.gated: cancelled")
        _write(params.ledger, ctx, "end")
        return 1 + _numbers(ctx.inputs)

    def aggregate(self, params: GatedParams, ctx: JobContext) -> Any:
        return _numbers(ctx.inputs)
