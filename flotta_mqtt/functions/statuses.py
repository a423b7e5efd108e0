"""Calls settled from their artifact's statuses: each job's outcome, or why there is none."""

from __future__ import annotations

from typing import Any

from flotta_mqtt.functions.batches import Batch
from flotta_mqtt.functions.handles import CallFailed, CallHandle
from flotta_mqtt.model import ARTIFACT_FINAL, JOB_FINAL, JobState
from flotta_mqtt.protocol.messages import ArtifactStatus


def apply_status(batch: Batch, status: ArtifactStatus) -> bool:
    """Settle the calls whose jobs the status lists as final; whether the artifact is."""
    batch.seq = status.seq
    for summary in status.jobs or []:
        handle = batch.calls.get(summary.name or "")
        if handle is None or summary.name in batch.settled:
            continue
        handle.record_job(summary)
        if summary.state not in JOB_FINAL:
            continue
        batch.settled.add(summary.name or "")
        failed = summary.state is not JobState.COMPLETED
        handle.settle(
            summary, explain(handle, summary.state, summary.error, status) if failed else None
        )
    return status.state in ARTIFACT_FINAL


def settle_rest(batch: Batch, failure: CallFailed | None, status: ArtifactStatus | None) -> None:
    """Fail every call not settled yet: with `failure`, else with what the status says."""
    for name, handle in batch.calls.items():
        if name not in batch.settled:
            handle.settle(None, failure or explain(handle, None, None, status))


def explain(
    handle: CallHandle[Any],
    state: JobState | None,
    error: str | None,
    status: ArtifactStatus | None,
) -> CallFailed:
    """Why a call has no outcome, from its job's summary and the artifact's status."""
    remote = status.error if status is not None else None
    if remote is not None and remote.type == "BindingError" and "python executor" in remote.message:
        return CallFailed(
            f"no worker allows shipped code for {handle.function}: no worker the scheduler "
            "knows offers the python executor, which a worker runs only with allow_code: true "
            "in its config (and carries the labels the call's platform asks for). "
            f"Scheduler: {remote.message}",
            "BindingError",
        )
    if state is JobState.FAILED:
        traceback = ""
        summary = handle.job()
        if status is not None and status.error is not None and summary is not None:
            traceback = status.error.traceback if status.failed_job == summary.id else ""
        kind = (error or "").partition(":")[0] or "JobFailed"  # summaries say "Type: message"
        return CallFailed(f"{handle.function} failed on its worker: {error}", kind, traceback)
    if remote is not None:
        what = "cancelled" if state is JobState.CANCELLED else "failed"
        return CallFailed(
            f"{handle.function} {what}: {remote.type}: {remote.message}",
            remote.type,
            remote.traceback,
        )
    return CallFailed(f"{handle.function} ended without an outcome", "Unknown")
