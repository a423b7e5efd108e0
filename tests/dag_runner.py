"""Run a bound artifact's jobs in this process, in job order, as the engine would: every
product through JSON (as the store holds it), a job consuming its predecessors' products.

Importable as `from dag_runner import run_artifact` (tests/ is on sys.path). A job for
which `drop(job)` is true does not run, as if its site fell silent past its round's
dropout: like the scheduler, its site's later rounds of the same step drop with it, and
the jobs consuming it go on without its product.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from flotta_mqtt import analytics as operations
from flotta_mqtt.model import Artifact, Job, NodeRef, SchedulerContext, bind
from flotta_mqtt.protocol import JobReady
from flotta_mqtt.scheduler.job_messages import job_message

INITIATOR = "initiator"


def job_ready(artifact: Artifact, job: Job) -> JobReady:
    """A job's first attempt's message, as the scheduler builds it (no inputs or cache)."""
    return job_message(artifact, job, 1, [], None, "Succeeded")


def run_artifact(
    artifact: Artifact,
    datasets: Mapping[str, Any],
    drop: Callable[[Job], bool] = lambda job: False,
) -> tuple[Any, dict[int, bytes]]:
    """The artifact's result (its last job's product) and every product's bytes by job."""
    context = SchedulerContext(
        initiator=NodeRef(id=INITIATOR), workers=[NodeRef(id=name) for name in datasets]
    )
    graph = bind(artifact, context)
    products: dict[int, bytes] = {}
    gone: set[int] = set()
    for job in graph:
        site_gone = any(
            before in gone and graph.jobs[before].worker == job.worker
            for before in graph.consumes(job.id)
        )
        if job.dropout is not None and (site_gone or drop(job)):
            gone.add(job.id)
            continue
        inputs = [json.loads(products[p]) for p in graph.consumes(job.id) if p in products]
        ctx = operations.JobContext(
            job=job_ready(artifact, job),
            node=job.worker,
            inputs=inputs,
            data=None if job.on_initiator else datasets[job.worker],
        )
        products[job.id] = json.dumps(operations.run(ctx), allow_nan=False).encode()
    return json.loads(products[graph.sinks()[-1]]), products
