"""A worker's attempts: a runner's report counts only for the attempt it was given."""

from __future__ import annotations

from helpers import job_ready

from flotta_mqtt.protocol import JobFinished, Resource
from flotta_mqtt.transport.store import sha256_hex
from flotta_mqtt.worker.attempts import Attempt, Attempts, Work


def finished(attempt: Attempt) -> JobFinished:
    product = Resource(url="data:,null", sha256=sha256_hex(b"null"), size=4)
    return JobFinished(job=attempt.job.ref, product=product, started_at=1.0, finished_at=2.0)


def test_a_forgotten_attempts_late_report_does_not_count_for_the_job_taken_again() -> None:
    """An attempt forgotten (acknowledged) and taken again (same job, same attempt
    number, re-sent late): its new run's result is the one published, even when the old
    run's report arrives first."""
    attempts = Attempts()
    old = attempts.receive(job_ready(0))
    assert isinstance(old, Attempt)
    old.cancelled.set()
    attempts.acknowledged([old.job.ref])
    new = attempts.receive(job_ready(0))
    assert isinstance(new, Attempt) and new is not old

    old_work, new_work = Work(old.job, old.cancelled), Work(new.job, new.cancelled)
    attempts.started(old_work, at=1.0, clock=1.0)
    assert attempts.finished(old_work, finished(old), now=3.0) is None
    assert not new.done and new.started_at is None

    attempts.started(new_work, at=4.0, clock=4.0)
    result = finished(new)
    assert attempts.finished(new_work, result, now=5.0) is result
    assert new.done and new.final is result
