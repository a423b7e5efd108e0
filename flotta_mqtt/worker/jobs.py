"""What running a job means on a worker: an analytics operation on its datasets, or a
workflow task through its executors; either way a product in the store and a result."""

from __future__ import annotations

import json
import threading
import time
import traceback

from flotta_mqtt import analytics as operations
from flotta_mqtt.protocol import JobFailed, JobFinished, JobReady, RemoteError
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker.journal import Final
from flotta_mqtt.workflows.executors import TaskError, TaskRunner

# json.dumps(product, allow_nan=False) builds an encoder per call; one is enough.
_PRODUCT_JSON = json.JSONEncoder(allow_nan=False)


class Jobs:
    """Runs jobs for one worker; safe to call from several runner threads at once."""

    def __init__(
        self,
        node: str,
        store: ResourceStore,
        tasks: TaskRunner,
        datasets: dict[str, operations.FileDataset],
    ) -> None:
        self.node = node
        self.store = store
        self.tasks = tasks
        self.datasets = datasets

    def run(self, job: JobReady, cancelled: threading.Event, started: float) -> Final:
        """Run `job`; a failure of the job is its result (JobFailed), never raised."""
        exit_code: int | None = None
        try:
            if job.kind == "tasks":
                product = self.tasks.run(job, self.node, cancelled)
                exit_code = product["exit_code"]
            else:
                folder = self.store.artifact_root(job.artifact_id)
                inputs = [json.loads(self.store.get(r, folder)) for r in job.inputs]
                context = operations.JobContext(
                    job=job,
                    node=self.node,
                    inputs=inputs,
                    data=self.datasets.get(job.project),
                    cancelled=cancelled,
                )
                product = operations.run(context)
            data = _PRODUCT_JSON.encode(product).encode()
            resource = self.store.put_product(job.artifact_id, str(job.job_id), job.attempt, data)
        except Exception as exc:
            return JobFailed(
                job=job.ref,
                error=RemoteError(
                    type=type(exc).__name__, message=str(exc), traceback=traceback.format_exc()
                ),
                started_at=started,
                finished_at=time.time(),
                exit_code=exc.exit_code if isinstance(exc, TaskError) else None,
            )
        return JobFinished(
            job=job.ref,
            product=resource,
            started_at=started,
            finished_at=time.time(),
            exit_code=exit_code,
        )
