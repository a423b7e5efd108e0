"""What the scheduler tells others about its artifacts: statuses (folded while only
progress changes), the locks each burst released, and acknowledgements of results
(batched, since they only stop re-sends)."""

from __future__ import annotations

from collections.abc import Callable, Collection, MutableMapping

from flotta_mqtt.model import ARTIFACT_FINAL, ArtifactState
from flotta_mqtt.protocol import (
    ArtifactStatus,
    EventAck,
    JobRef,
    JobSummary,
    LocksReleased,
    Resource,
    topics,
)
from flotta_mqtt.scheduler.config import ACK_BATCH, ACK_DELAY, LISTED_JOBS, STATUS_INTERVAL
from flotta_mqtt.scheduler.effects import Clock, Decision, UpdateArtifact
from flotta_mqtt.scheduler.records import ArtifactRecord, JobFacts

# Stores the list of an artifact's results too long for its status: where it is, or None
# if it could not be stored (the artifact's end is announced all the same).
ResultsManifest = Callable[[str, list[Resource]], Resource | None]


class Announcements:
    """What a burst changed, turned into messages when they are due."""

    def __init__(self) -> None:
        self._changed: set[str] = set()
        self._released: dict[str, list[tuple[int, int]]] = {}
        self._acks: dict[str, list[JobRef]] = {}
        self._deferred: dict[str, float] = {}  # artifact → when its folded status is due
        self.acks_due: float | None = None  # when the oldest pending acknowledgement is due

    @property
    def status_due(self) -> float | None:
        """When the earliest folded status is due, if any is waiting."""
        return min(self._deferred.values()) if self._deferred else None

    def changed(self, artifact_id: str) -> None:
        self._changed.add(artifact_id)

    def released(self, artifact_id: str, locks: list[tuple[int, int]]) -> None:
        self._released.setdefault(artifact_id, []).extend(locks)

    def acknowledge(self, worker: str, ref: JobRef) -> None:
        """Acknowledge a worker's final event (within ACK_DELAY, with others)."""
        self._acks.setdefault(worker, []).append(ref)

    def collect(
        self,
        artifacts: MutableMapping[str, ArtifactRecord],
        known: Collection[str],
        clock: Clock,
        decision: Decision,
    ) -> None:
        """Turn what changed into the messages that announce it, when they are due.

        A changed artifact's status is recorded (its new seq and state, written in this
        burst) and built after the commit, with the locks released since its last status;
        while only its jobs' progress changed, it waits until STATUS_INTERVAL after its
        last status. A finished artifact leaves memory: the repository keeps it.
        """
        now = clock.monotonic
        if self._acks:
            due = self.acks_due = self.acks_due or now + ACK_DELAY
            for worker, refs in list(self._acks.items()):
                if due <= now or len(refs) >= ACK_BATCH:
                    decision.publish.append((topics.control(worker), EventAck(jobs=refs), False))
                    del self._acks[worker]
            if not self._acks:
                self.acks_due = None
        for artifact_id, due in list(self._deferred.items()):
            if due <= now:
                del self._deferred[artifact_id]
                self._changed.add(artifact_id)
        for artifact_id in self._changed:
            record = artifacts.get(artifact_id)
            if record is None:
                if artifact_id in known:
                    decision.stored.append(artifact_id)
                continue
            if record.state is record.announced:
                due = record.announced_at + STATUS_INTERVAL
                if due > now:
                    self._deferred.setdefault(artifact_id, due)
                    continue
            self._deferred.pop(artifact_id, None)
            record.announced, record.announced_at = record.state, now
            released = self._released.pop(artifact_id, None)
            if released:
                message = LocksReleased(artifact_id=artifact_id, locks=released)
                decision.publish.append((topics.locks(record.client, artifact_id), message, False))
            decision.writes.append(restamp(record, clock.wall))
            decision.statuses.append((record, clock.wall))
            if record.state in ARTIFACT_FINAL:
                del artifacts[artifact_id]
        self._changed.clear()


def restamp(record: ArtifactRecord, wall: float) -> UpdateArtifact:
    """Give the artifact's next status its seq; the row that records it."""
    record.seq += 1
    return UpdateArtifact(
        record.id, record.state, record.seq, wall, record.error, record.failed_job
    )


def build_status(
    record: ArtifactRecord, wall: float, allow_download: bool, manifest: ResultsManifest
) -> ArtifactStatus:
    """The status recorded for `record` at `wall` (built after the commit)."""
    counts = {state: n for state, n in record.counts.items() if n}
    results: list[Resource] = []
    if record.state is ArtifactState.COMPLETED and allow_download and record.graph:
        # An on_failure handler skipped by the scheduler ran nowhere and left no product.
        results = [record.products[j] for j in record.graph.sinks() if j in record.products]
        if len(results) > LISTED_JOBS:  # too many for a message: one manifest of them
            stored = manifest(record.id, results)
            results = [stored] if stored is not None else []
    jobs = summaries(record)
    if jobs is not None and not allow_download:  # no product leaves by the job list either
        jobs = [j if j.product is None else j.model_copy(update={"product": None}) for j in jobs]
    # Small artifacts carry their DAG's locks beside the job list, for drawing it.
    locks = listed_locks(record) if jobs is not None else None
    return ArtifactStatus(
        artifact_id=record.id,
        project=record.artifact.project,
        state=record.state,
        seq=record.seq,
        total=len(record.jobs),
        counts=counts,
        error=record.error,
        failed_job=record.failed_job,
        results=results,
        jobs=jobs,
        locks=locks,
        holders=[node.id for node in record.context.workers] if record.context else [],
        missing=record.context.missing if record.context else [],
        updated_at=wall,
    )


def summaries(record: ArtifactRecord) -> list[JobSummary] | None:
    """The job listing of a small artifact's status; None for a large one.

    Most jobs did not change since the last status: their summaries (immutable) are
    reused, and only those whose state, worker, facts or product changed are rebuilt.
    """
    if record.graph is None or not record.listed:
        return None
    cache = record.listing.summaries
    listed = []
    for job, status in zip(record.graph.jobs, record.jobs, strict=True):
        facts = record.listing.facts.get(job.id, JobFacts())
        worker = record.worker(job.id)
        product = record.products.get(job.id)
        key = (
            status,
            worker,
            facts.started_at,
            facts.finished_at,
            facts.size,
            facts.exit_code,
            facts.error,
        )
        cached = cache.get(job.id)
        if cached is not None and cached[0] == key and cached[1] is product:
            listed.append(cached[2])
            continue
        summary = JobSummary(
            id=job.id,
            step=job.step,
            worker=worker,
            state=status.state,
            attempt=status.attempt,
            name=str(job.operation.params["name"]) if job.kind == "tasks" else None,
            started_at=facts.started_at,
            finished_at=facts.finished_at,
            size=facts.size,
            exit_code=facts.exit_code,
            error=facts.error,
            product=product,
        )
        cache[job.id] = (key, product, summary)
        listed.append(summary)
    return listed


def listed_locks(record: ArtifactRecord) -> list[tuple[int, int]]:
    """The DAG's locks, sorted (once: they never change once bound)."""
    assert record.graph is not None
    if record.listing.locks is None:
        record.listing.locks = sorted(record.graph.locks)
    return record.listing.locks
