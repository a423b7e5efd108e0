"""Dropouts: a site that does not finish a round of a secure aggregation in time leaves it.

Secure aggregation (SecAgg+) is built to go on without sites that fall silent: the
round's other sites unmask the sum of those that stayed. So a job with a `dropout` is
not waited for until the artifact's deadline, as a worker's data job otherwise is; once
it has been out that long without a result, its site drops out of the round.
"""

from __future__ import annotations

from flotta_mqtt.scheduler.jobs import JobFlow
from flotta_mqtt.scheduler.records import ArtifactRecord


def check_dropouts(record: ArtifactRecord, now: float, flow: JobFlow) -> None:
    """Drop every dispatched job of a secure round older than its dropout (monotonic `now`)."""
    assert record.graph is not None
    if not record.graph.dropouts:  # most artifacts: no need to look at each dispatched job
        return
    jobs = record.graph.jobs
    for job_id, dispatched in list(record.attempts.dispatched_at.items()):
        dropout = jobs[job_id].dropout
        if dropout is not None and now - dispatched > dropout and not record.jobs[job_id].final:
            flow.drop(
                record,
                job_id,
                f"{record.worker(job_id)} did not finish job {job_id} within the round's "
                f"dropout of {dropout} s",
            )
