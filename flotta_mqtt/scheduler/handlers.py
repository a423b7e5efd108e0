"""Exit handlers: a workflow's `on_exit` and `on_failure` tasks wait, outside the locks,
until every other task is final (completed, skipped, failed or cancelled); then `on_exit`
ones run whatever the outcome, and `on_failure` ones run if a task failed, else are
skipped. The artifact's final state still says whether a task failed."""

from __future__ import annotations

from flotta_mqtt.model import JOB_FINAL, JobState
from flotta_mqtt.scheduler.records import ArtifactRecord


def others_final(record: ArtifactRecord) -> bool:
    """Whether every job but the exit handlers' is final."""
    assert record.graph is not None
    handlers = record.graph.handlers
    final = sum(record.counts[state] for state in JOB_FINAL)
    final_handlers = sum(1 for job in handlers if record.jobs[job].final)
    return final - final_handlers == len(record.jobs) - len(handlers)


def held(record: ArtifactRecord, job_id: int) -> bool:
    """Whether a job is an exit handler that must wait for the other tasks."""
    assert record.graph is not None
    return record.graph.jobs[job_id].handler is not None and not others_final(record)


def unlocked_handlers(record: ArtifactRecord) -> list[int]:
    """The exit handlers free to start now: the others are final and their own locks free."""
    assert record.graph is not None and record.locks is not None
    if not record.graph.handlers or not others_final(record):
        return []
    return [
        job
        for job in record.graph.handlers
        if record.jobs[job].state is JobState.WAITING
        and record.locks.held(job) == 0
        and job not in record.locks.completed
    ]


def runs(record: ArtifactRecord, job_id: int) -> bool:
    """Whether a due exit handler runs: an on_failure one only if a task failed."""
    assert record.graph is not None
    return record.graph.jobs[job_id].handler != "failure" or record.error is not None
