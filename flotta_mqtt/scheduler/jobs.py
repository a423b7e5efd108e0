"""How one artifact and its jobs move: dispatch, start, completion, failure and retry,
cancellation, and the artifact's end. Every change is made in memory and recorded as a
write and the messages that announce it; nothing here reads a clock or touches I/O."""

from __future__ import annotations

import logging
from collections.abc import Callable

import networkx as nx
from pydantic import ValidationError

from flotta_mqtt.model import (
    ARTIFACT_FINAL,
    JOB_FINAL,
    ArtifactState,
    Job,
    JobState,
    JobStatus,
)
from flotta_mqtt.protocol import (
    CancelJob,
    JobFinished,
    JobRef,
    RemoteError,
    topics,
)
from flotta_mqtt.scheduler import handlers
from flotta_mqtt.scheduler.announcements import Announcements
from flotta_mqtt.scheduler.binding import Bound
from flotta_mqtt.scheduler.effects import (
    BindArtifact,
    CancelJobs,
    Clock,
    Decision,
    Outgoing,
    UpdateJob,
)
from flotta_mqtt.scheduler.job_messages import job_message, uses_cache
from flotta_mqtt.scheduler.metrics import SchedulerMetrics
from flotta_mqtt.scheduler.quotas import Quotas
from flotta_mqtt.scheduler.records import ArtifactRecord
from flotta_mqtt.scheduler.retries import RetryPolicy

log = logging.getLogger(__name__)


class JobFlow:
    """The transitions of artifacts and jobs, writing into the burst's decision."""

    def __init__(
        self,
        announcements: Announcements,
        metrics: SchedulerMetrics,
        retries: RetryPolicy,
        quotas: Quotas,
        tenant_of: Callable[[str], str] | None = None,
    ) -> None:
        self.announcements = announcements
        # An owner's tenant (a registry's), whose cached task runs its tasks may reuse;
        # None: no registry, everyone one tenant (`*`).
        self.tenant_of = tenant_of
        self.quotas = quotas
        self.metrics = metrics
        self.retries = retries
        self.decision = Decision()
        self.clock = Clock(0.0, 0.0, 0.0)
        self.arrived = 0.0  # when the message being handled arrived (monotonic)

    def begin(self, decision: Decision, clock: Clock) -> None:
        """Start a burst: its decisions go to `decision`, its time is `clock`."""
        self.decision, self.clock, self.arrived = decision, clock, clock.monotonic

    def end(self) -> Decision:
        """End the burst: its decision, no longer held here (it holds records and graphs
        that a finished artifact no longer needs)."""
        decision, self.decision = self.decision, Decision()
        return decision

    # --- artifacts -----------------------------------------------------------------------

    def run(self, record: ArtifactRecord, bound: Bound) -> None:
        """Start a bound artifact: record its DAG and make its first jobs ready."""
        self.decision.writes.append(BindArtifact(record.id, bound.context, bound.graph))
        record.context = bound.context
        record.bound(bound.graph, completed=[])
        self.transition(record, ArtifactState.RUNNING)
        for job_id in record.locks.ready() if record.locks else []:
            self.make_ready(record, job_id)

    def transition(self, record: ArtifactRecord, state: ArtifactState) -> None:
        record.state = state
        if state in ARTIFACT_FINAL:
            self.quotas.release(record.id)
        self.metrics.artifact(state)
        self.announcements.changed(record.id)

    def fail(
        self,
        record: ArtifactRecord,
        kind: str,
        message: str,
        job: int | None = None,
        error: RemoteError | None = None,
    ) -> None:
        record.error = error or RemoteError(type=kind, message=message)
        record.failed_job = job
        self.stop_jobs(record)
        self.transition(record, ArtifactState.FAILED)

    def cancel(self, record: ArtifactRecord, reason: str) -> None:
        record.error = RemoteError(type="Cancelled", message=reason)
        self.stop_jobs(record)
        self.transition(record, ArtifactState.CANCELLED)

    def stop_jobs(self, record: ArtifactRecord) -> None:
        """Cancel every unfinished job; tell workers running one to stop it."""
        for job_id, status in enumerate(record.jobs):
            if status.final:
                continue
            if status.state in (JobState.DISPATCHED, JobState.RUNNING) and record.graph:
                self.stop_attempt(record, job_id)
            record.set_job(job_id, status.cancel())
        self.decision.writes.append(CancelJobs(record.id))

    def settle(self, record: ArtifactRecord) -> None:
        """Start the exit handlers once the other jobs are final; end the artifact once
        every job is: failed if any task failed."""
        due = handlers.unlocked_handlers(record) if record.state is ArtifactState.RUNNING else []
        while due and record.state is ArtifactState.RUNNING:  # not once a job failed it
            job_id = due.pop(0)
            if handlers.runs(record, job_id):
                self.make_ready(record, job_id)
                continue
            assert record.locks is not None
            record.set_job(job_id, record.jobs[job_id].skip())
            record.note(job_id, error="skipped: an on_failure task, and no task failed")
            self.decision.writes.append(UpdateJob(record.id, job_id, JobState.SKIPPED, 0))
            due += record.locks.release(job_id)
            self.announcements.changed(record.id)
        final = sum(map(record.counts.__getitem__, JOB_FINAL))  # per job: no generator
        if final == len(record.jobs) and record.state not in ARTIFACT_FINAL:
            failed = record.error is not None
            self.transition(record, ArtifactState.FAILED if failed else ArtifactState.COMPLETED)

    # --- dispatch --------------------------------------------------------------------------

    def make_ready(self, record: ArtifactRecord, job_id: int) -> None:
        """A job whose locks are all released becomes ready and is dispatched."""
        if record.jobs[job_id].state is not JobState.WAITING or handlers.held(record, job_id):
            return  # cancelled, as the descendant of a failed task; or an exit handler
        record.set_job(job_id, record.jobs[job_id].ready())
        self.dispatch(record, job_id)

    def dispatch(self, record: ArtifactRecord, job_id: int) -> None:
        """Send a ready job: a new attempt, recorded before it is published."""
        if record.state in ARTIFACT_FINAL:
            return  # failed by another job's message in the same loop (see job_ready)
        status = record.jobs[job_id].dispatch()
        message = self.job_ready(record, job_id, status.attempt)
        if message is None:
            return  # its artifact failed instead
        record.set_job(job_id, status)
        self.decision.writes.append(UpdateJob(record.id, job_id, status.state, status.attempt))
        dispatched_at = record.attempts.dispatched_at
        dispatched_at.pop(job_id, None)  # kept in dispatch order: see resends
        dispatched_at[job_id] = self.clock.monotonic
        self.metrics.dispatched()
        self.decision.publish.append(message)

    def resend(self, record: ArtifactRecord, job_id: int) -> None:
        """Send the current attempt of a dispatched job again (not a new attempt)."""
        if record.state in ARTIFACT_FINAL:
            return  # failed by another job's message in the same loop (see job_ready)
        message = self.job_ready(record, job_id)
        if message is not None:
            record.attempts.resent_at[job_id] = self.clock.monotonic
            self.decision.publish.append(message)

    def job_ready(
        self, record: ArtifactRecord, job_id: int, attempt: int | None = None
    ) -> Outgoing | None:
        """The JobReady message of a job's attempt (its current one by default), to its
        worker; None if it cannot be built, and the artifact fails instead of the scheduler
        failing on it at every tick."""
        assert record.graph is not None
        job = record.graph.jobs[job_id]
        try:
            message = job_message(
                record.artifact,
                job,
                record.jobs[job_id].attempt if attempt is None else attempt,
                # Every job it consumes is final: completed, or dropped out with no product.
                [record.products[p] for p in record.graph.consumes(job_id) if p in record.products],
                self._cache_scope(record, job),
                "Failed" if record.error is not None else "Succeeded",
            )
        except ValidationError as exc:
            why = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            log.error(
                "scheduler: the message of job %s of %s is invalid: %s", job_id, record.id, why
            )
            self.fail(record, "InvalidJob", f"job {job_id} cannot be sent: {why}", job=job_id)
            return None
        return topics.jobs(record.worker(job_id)), message, False

    def _cache_scope(self, record: ArtifactRecord, job: Job) -> str | None:
        """Whose cache a workflow task with `cache` may use: its owner's tenant."""
        if not uses_cache(job):
            return None
        return "*" if self.tenant_of is None else self.tenant_of(record.client)

    def stop_attempt(self, record: ArtifactRecord, job_id: int) -> None:
        """Tell the job's worker to stop its current attempt."""
        ref = JobRef(artifact_id=record.id, job_id=job_id, attempt=record.jobs[job_id].attempt)
        self.decision.publish.append(
            (topics.control(record.worker(job_id)), CancelJob(job=ref), False)
        )

    # --- what workers report ----------------------------------------------------------------

    def started(self, record: ArtifactRecord, ref: JobRef, at: float) -> None:
        status = record.jobs[ref.job_id]
        if status.state is not JobState.DISPATCHED:
            return
        record.set_job(ref.job_id, status.start(ref.attempt))
        self.announcements.changed(record.id)
        attempts = record.attempts
        attempts.accepted.add(ref.job_id)
        sent = attempts.dispatched_at.get(ref.job_id)
        self.metrics.started(None if sent is None else self.arrived - sent)
        attempts.started_at[ref.job_id] = attempts.last_seen[ref.job_id] = self.clock.monotonic
        record.note(ref.job_id, started_at=at)
        self.decision.writes.append(
            UpdateJob(record.id, ref.job_id, JobState.RUNNING, ref.attempt, started_at=at)
        )

    def finished(self, record: ArtifactRecord, event: JobFinished) -> None:
        ref = event.job
        status = record.jobs[ref.job_id]
        if status.state is JobState.DISPATCHED and status.attempt == ref.attempt:
            self.started_unannounced(record, ref.job_id, event.finished_at - event.started_at)
        done = (
            status.skip(ref.attempt) if event.skipped is not None else status.complete(ref.attempt)
        )
        record.set_job(ref.job_id, done)
        self.metrics.completed(event.finished_at - event.started_at)
        record.products[ref.job_id] = event.product
        record.attempts.forget(ref.job_id)
        record.note(
            ref.job_id,
            started_at=event.started_at,
            finished_at=event.finished_at,
            size=event.product.size,
            exit_code=event.exit_code,
            error=None if event.skipped is None else f"skipped: {event.skipped}"[:300],
        )
        self.decision.writes.append(
            UpdateJob(
                record.id,
                ref.job_id,
                done.state,
                ref.attempt,
                started_at=event.started_at,
                finished_at=event.finished_at,
                product=event.product,
                exit_code=event.exit_code,
            )
        )
        assert record.locks is not None and record.graph is not None
        unlocked = record.locks.release(ref.job_id)
        self.announcements.released(
            record.id, [(ref.job_id, j) for j in record.graph.unlocks(ref.job_id)]
        )
        self.announcements.changed(record.id)
        for job_id in unlocked:
            self.make_ready(record, job_id)
        self.settle(record)

    def failed(
        self,
        record: ArtifactRecord,
        ref: JobRef,
        error: RemoteError,
        finished_at: float,
        exit_code: int | None = None,
    ) -> None:
        """A failed attempt: retry it with backoff while the step allows, else fail it all.

        A failed workflow task fails the artifact but stops only its descendants: the
        independent branches go on, and the artifact ends when they have.
        """
        assert record.graph is not None
        job = record.graph.jobs[ref.job_id]
        status = record.jobs[ref.job_id]
        record.note(
            ref.job_id,
            finished_at=finished_at,
            exit_code=exit_code,
            error=f"{error.type}: {error.message}"[:300],
        )
        if self.retries.may_retry(job, ref.attempt):
            log.warning(
                "job %s/%s attempt %d failed (%s: %s): retrying",
                ref.artifact_id,
                ref.job_id,
                ref.attempt,
                error.type,
                error.message,
            )
            self.retry(record, ref.job_id, status.requeue(ref.attempt))
            return
        record.set_job(ref.job_id, status.fail(ref.attempt))
        self.metrics.failed()
        record.attempts.forget(ref.job_id)
        self.decision.writes.append(
            UpdateJob(
                record.id,
                ref.job_id,
                JobState.FAILED,
                ref.attempt,
                finished_at=finished_at,
                error=error,
                exit_code=exit_code,
            )
        )
        if job.kind != "tasks":
            self.fail(record, error.type, error.message, ref.job_id, error)
            return
        if record.error is None:
            record.error, record.failed_job = error, ref.job_id
        for descendant in nx.descendants(record.graph.graph, ref.job_id):
            if not record.jobs[descendant].final:
                record.set_job(descendant, record.jobs[descendant].cancel())
                self.decision.writes.append(UpdateJob(record.id, descendant, JobState.CANCELLED, 0))
        self.announcements.changed(record.id)
        self.settle(record)

    def drop(self, record: ArtifactRecord, job_id: int, why: str) -> None:
        """A site silent past its round's dropout leaves a secure aggregation: its job and
        its own later rounds end (cancelled, with `why`), and their locks are released,
        so the jobs consuming them go on with the other sites' products."""
        assert record.graph is not None and record.locks is not None
        graph = record.graph
        worker = record.worker(job_id)
        dropped, error = [job_id], RemoteError(type="DroppedOut", message=why)
        for job in dropped:  # grows as the site's later rounds are found
            dropped += [
                after
                for after in graph.unlocks(job)
                if record.worker(after) == worker
                and graph.jobs[after].dropout is not None
                and after not in dropped
            ]
        for job in dropped:
            status = record.jobs[job]
            if status.final:
                continue
            if status.state in (JobState.DISPATCHED, JobState.RUNNING):
                self.stop_attempt(record, job)
            record.set_job(job, status.cancel())
            record.attempts.forget(job)
            record.attempts.retry_at.pop(job, None)
            record.note(job, finished_at=self.clock.wall, error=f"DroppedOut: {why}"[:300])
            self.decision.writes.append(
                UpdateJob(record.id, job, JobState.CANCELLED, status.attempt, error=error)
            )
        log.warning(
            "artifact %s: %s dropped out of step %s", record.id, worker, graph.jobs[job_id].step
        )
        unlocked = [after for job in dropped for after in record.locks.release(job)]
        self.announcements.released(
            record.id, [(job, after) for job in dropped for after in graph.unlocks(job)]
        )
        self.announcements.changed(record.id)
        for after in sorted(set(unlocked)):
            self.make_ready(record, after)
        self.settle(record)

    def retry(self, record: ArtifactRecord, job_id: int, requeued: JobStatus) -> None:
        """Make the job ready again; it is dispatched once its backoff is over."""
        record.set_job(job_id, requeued)
        self.metrics.retried()
        record.attempts.forget(job_id)
        self.decision.writes.append(UpdateJob(record.id, job_id, JobState.READY, requeued.attempt))
        record.attempts.retry_at[job_id] = self.retries.retry_at(
            self.clock.monotonic, requeued.attempt
        )
        self.announcements.changed(record.id)

    def started_unannounced(self, record: ArtifactRecord, job_id: int, ran_for: float) -> None:
        """Count the start of an attempt whose result came before any JobStarted.

        Workers announce only the jobs still running a moment after they started. For a
        quick one, the dispatch latency is the time to its result less the time it ran:
        a difference of the worker's own clock, so no skew between clocks enters.
        """
        sent = record.attempts.dispatched_at.get(job_id)
        self.metrics.started(None if sent is None else max(0.0, self.arrived - sent - ran_for))
