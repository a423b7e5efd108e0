"""What running a job means on a worker: an analytics operation on its datasets, or a
workflow task through its executors; either way a product in the store and a result."""

from __future__ import annotations

import json
import threading
import time
import traceback

from flotta_mqtt import analytics as operations
from flotta_mqtt.protocol import JobFailed, JobFinished, JobReady, JobRef, RemoteError
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker.journal import Final, Journal
from flotta_mqtt.workflows.caching import CACHED_PRODUCT
from flotta_mqtt.workflows.executors import TaskError, TaskRunner

# json.dumps(product, allow_nan=False) builds an encoder per call; one is enough.
_PRODUCT_JSON = json.JSONEncoder(allow_nan=False)


class Ledger(operations.Budget):
    """A job's spending, recorded in the worker's journal before its product leaves."""

    def __init__(self, journal: Journal, node: str, job: JobRef) -> None:
        self.journal = journal
        self.node = node
        self.job = job

    def spend(
        self, project: str, epsilon: float, delta: float, policy: operations.PrivacyPolicy
    ) -> None:
        if not self.journal.durable:
            raise operations.PrivacyRefused(
                f"worker {self.node} keeps no journal on disk (state_dir), so no privacy "
                "ledger that outlives a restart: it answers no noised query"
            )
        left = self.journal.spend(self.job, project, epsilon, delta, (policy.epsilon, policy.delta))
        if left is not None:
            raise operations.BudgetExceeded(
                f"worker {self.node}: project {project}: this job asks epsilon {epsilon:g} and "
                f"delta {delta:g}, but the site's privacy budget has {left[0]:g} and "
                f"{left[1]:g} left (of {policy.epsilon:g} and {policy.delta:g})"
            )


class Jobs:
    """Runs jobs for one worker; safe to call from several runner threads at once."""

    def __init__(
        self,
        node: str,
        store: ResourceStore,
        tasks: TaskRunner,
        datasets: dict[str, operations.Dataset],
        journal: Journal,
    ) -> None:
        self.node = node
        self.store = store
        self.tasks = tasks
        self.datasets = datasets
        self.journal = journal

    def instant(self, job: JobReady) -> bool:
        """Whether `job` runs in microseconds: an instant operation whose inputs travel
        inline (reading one from the store could take any time)."""
        if job.kind == "tasks":
            return False
        definition = operations.REGISTRY.get(job.operation.name)
        return (
            definition is not None
            and definition.instant
            and all(resource.url.startswith("data:") for resource in job.inputs)
        )

    def run(self, job: JobReady, cancelled: threading.Event, started: float) -> Final:
        """Run `job`; a failure of the job is its result (JobFailed), never raised."""
        exit_code: int | None = None
        skipped: str | None = None
        try:
            media_type = "application/json"
            if job.kind == "tasks":
                product = self.tasks.run(job, self.node, cancelled)
                exit_code, skipped = product["exit_code"], product.get("skipped")
                data = _PRODUCT_JSON.encode(product).encode()
                if "cached" in product:
                    media_type = CACHED_PRODUCT
            else:
                data = self._operation(job, cancelled)
            resource = self.store.put_product(
                job.artifact_id, str(job.job_id), job.attempt, data, media_type
            )
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
            skipped=skipped,
        )

    def _operation(self, job: JobReady, cancelled: threading.Event) -> bytes:
        """An operation's product; an attempt that paid for a noised product and runs
        again (after a restart) releases the same bytes, not a second draw."""
        ref = job.ref  # a new JobRef at each call
        again = self.journal.released(ref)
        if again is not None:
            return again
        folder = self.store.artifact_root(job.artifact_id)
        inputs = [json.loads(self.store.get(resource, folder)) for resource in job.inputs]
        ledger = Ledger(self.journal, self.node, ref)
        context = operations.JobContext(
            job=job,
            node=self.node,
            inputs=inputs,
            data=self.datasets.get(job.project),
            budget=ledger,
            cancelled=cancelled,
        )
        data = _PRODUCT_JSON.encode(operations.run(context)).encode()
        self.journal.keep(ref, data)
        return data
