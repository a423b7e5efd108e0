"""A workflow executor that does nothing, registered only by the benchmarks' worker processes.

Importing this module registers it as `noop`. A task run with it still goes through all of
the engine's work around a task (its JobReady, the runner's working folder, its stdout and
stderr logs and its product in the store, its events), so a fan-in of no-op tasks measures
what flotta_mqtt itself costs per task, as Dask, Celery and Ray are measured with no-op
Python functions.
"""

from __future__ import annotations

from flotta_mqtt.workflows.executors import Executor, TaskResult, TaskRun, register_executor


class NoopExecutor(Executor):
    name = "noop"

    def run(self, run: TaskRun) -> TaskResult:
        return TaskResult(exit_code=0, stdout=b"", stderr=b"")


register_executor("noop", NoopExecutor)
