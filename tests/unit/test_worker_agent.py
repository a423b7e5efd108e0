"""The worker agent on the in-memory transport: what it runs, publishes, re-sends and
forgets, with a stand-in scheduler's bus and no broker process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import job_ready, messages_of, wait_for
from worker_support import GATES, TIMEOUT, Station, gated, results, station

from flotta_mqtt.model import Operation
from flotta_mqtt.protocol import (
    JobAccepted,
    JobFailed,
    JobFinished,
    JobReady,
    JobStarted,
    Resource,
)
from flotta_mqtt.transport.store import ResourceStore, sha256_hex
from flotta_mqtt.worker.attempts import Work
from flotta_mqtt.worker.jobs import Jobs
from flotta_mqtt.worker.journal import Final, Journal
from flotta_mqtt.worker.runners import Done, Reports, Runners, Started
from flotta_mqtt.workflows.executors import (
    Executor,
    Site,
    TaskResult,
    TaskRun,
    TaskRunner,
    register_executor,
)


@pytest.fixture(name="station")
def station_fixture(tmp_path: Path) -> Iterator[Station]:
    yield from station(tmp_path)


def test_a_job_runs_and_its_result_is_published_once(station: Station) -> None:
    agent = station.worker()
    station.send(job_ready(0))
    (finished,) = station.wait_results(0)
    assert isinstance(finished, JobFinished) and finished.job == job_ready(0).ref
    # The job and its result stay journaled until the scheduler acknowledges the result
    # (written once the result is on its way).
    wait_for(
        lambda: [(h.job.job_id, h.final) for h in agent.journal.held()] == [(0, finished)],
        TIMEOUT,
        "the result was never journaled",
    )
    station.send(job_ready(1))  # a marker: anything sent about job 0 came before it
    station.wait_results(1)
    assert len(results(station.events.messages, 0)) == 1
    # A quick job's result is its only event.
    assert messages_of(station.events.messages, JobStarted) == []


def test_a_duplicate_job_is_answered_not_run_again(station: Station) -> None:
    station.worker()
    job = gated(0)
    station.send(job)
    GATES.wait_for(lambda: ("job-0", 1) in GATES.running, "the job never started")
    station.send(job)  # redelivered while it runs: the worker holds it
    station.events.wait_for(
        lambda m: messages_of(m, JobAccepted, lambda a: a.job == job.ref), TIMEOUT, "accepted"
    )
    GATES.release("job-0")
    (first,) = station.wait_results(0)
    station.send(job)  # redelivered once it ran: the result again
    assert station.wait_results(0, count=2) == [first, first]
    assert GATES.runs.count(("job-0", 1)) == 1


def test_a_stale_attempt_is_ignored(station: Station) -> None:
    station.worker()
    GATES.release("stale")
    station.send(gated(0, gate="stale", attempt=2))
    (second,) = station.wait_results(0)
    station.send(gated(0, gate="stale", attempt=1))  # an older attempt, re-sent late
    station.send(job_ready(1))  # a marker
    station.wait_results(1)
    assert station.wait_results(0) == [second]  # no answer to the stale attempt
    assert GATES.runs.count(("stale", 1)) == 0


def test_a_newer_attempt_replaces_a_running_one(station: Station) -> None:
    station.worker()
    station.send(gated(0, gate="replaced", attempt=1))
    GATES.wait_for(lambda: ("replaced", 1) in GATES.running, "attempt 1 never started")
    station.send(gated(0, gate="replaced", attempt=2))
    GATES.wait_for(lambda: ("replaced", 1) in GATES.cancelled, "attempt 1 never cancelled")
    GATES.release("replaced")
    (result,) = station.wait_results(0)
    assert result.job.attempt == 2


def test_cancel_stops_a_running_job_and_its_result_is_dropped(station: Station) -> None:
    station.worker()
    job = gated(0, gate="cancelled")
    station.send(job)
    GATES.wait_for(lambda: ("cancelled", 1) in GATES.running, "the job never started")
    station.cancel(job.ref)
    GATES.wait_for(lambda: ("cancelled", 1) in GATES.cancelled, "the cancel never reached it")
    station.send(job_ready(1))  # a marker
    station.wait_results(1)
    assert results(station.events.messages, 0) == []


def test_a_cancelled_job_is_forgotten_and_never_run_again(station: Station) -> None:
    """Nothing will ever acknowledge a cancelled attempt: the journal forgets it once its
    runner is through, so a restarted worker does not run it again."""
    first = station.worker()
    job = gated(0, gate="forgotten")
    station.send(job)
    GATES.wait_for(lambda: ("forgotten", 1) in GATES.running, "the job never started")
    station.cancel(job.ref)
    GATES.wait_for(lambda: ("forgotten", 1) in GATES.cancelled, "the cancel never reached it")
    wait_for(lambda: not first.journal.held(), TIMEOUT, "the cancelled job stayed journaled")
    station.workers.remove(first)
    first.stop()
    station.worker()  # one runner: a job resumed from the journal would run before the marker
    station.send(job_ready(1))
    station.wait_results(1)
    assert GATES.runs.count(("forgotten", 1)) == 1


def test_a_long_job_is_announced_once(station: Station) -> None:
    station.worker()
    job = gated(0, gate="long")
    station.send(job)
    station.events.wait_for(
        lambda m: messages_of(m, JobStarted), TIMEOUT, "the long job was never announced"
    )
    GATES.release("long")
    station.wait_results(0)
    assert [s.job for s in messages_of(station.events.messages, JobStarted)] == [job.ref]


def test_results_are_re_sent_until_acknowledged_then_forgotten(station: Station) -> None:
    agent = station.worker(resend_interval=0.02)
    station.send(job_ready(0))
    first, again = station.wait_results(0, count=2)  # the scheduler said nothing: re-sent
    assert again == first
    station.acknowledge(first.job)
    wait_for(lambda: not agent.journal.held(), TIMEOUT, "the result was never forgotten")
    copies = len(results(station.events.messages, 0))
    station.send(job_ready(1))
    station.wait_results(1, count=2)  # the re-send timer ran since
    assert len(results(station.events.messages, 0)) == copies


def test_a_restart_runs_held_jobs_again_and_re_sends_results(station: Station) -> None:
    first = station.worker()
    GATES.release("quick")
    station.send(gated(0, gate="quick"), gated(1, gate="restart"))
    (finished,) = station.wait_results(0)
    GATES.wait_for(lambda: ("restart", 1) in GATES.running, "job 1 never started")
    station.workers.remove(first)
    first.stop()  # job 1 is cut off: cancelled, its result dropped, still journaled
    GATES.wait_for(lambda: ("restart", 1) in GATES.cancelled, "job 1 never cancelled")
    GATES.release("restart")
    station.worker()
    assert station.wait_results(0, count=2)[1] == finished  # re-sent on connecting
    result = station.wait_results(1)[0]  # (and again on connecting, if it was that quick)
    assert isinstance(result, JobFinished) and result.job.job_id == 1
    assert GATES.runs.count(("restart", 1)) == 2


def test_never_more_than_max_jobs_run_at_once(station: Station) -> None:
    station.worker(max_jobs=2)
    station.send(*(gated(i, gate="crowd") for i in range(6)))
    GATES.wait_for(lambda: GATES.most >= 2, "two jobs never ran at once")
    GATES.release("crowd")
    for i in range(6):
        station.wait_results(i)
    assert GATES.most == 2


def test_a_failing_job_is_reported_and_the_worker_goes_on(station: Station) -> None:
    station.worker()
    bad = job_ready(0, operation=Operation(name="no-such-operation"))
    station.send(bad, job_ready(1))
    (failed,) = station.wait_results(0)
    assert isinstance(failed, JobFailed) and "no-such-operation" in failed.error.message
    assert isinstance(station.wait_results(1)[0], JobFinished)


def test_a_runner_outlives_an_error_outside_any_job() -> None:
    """A runner whose job breaks (not a failed job: a bug) reports no result and runs
    the next job."""
    woken = threading.Event()
    box = Reports(woken.set)

    def execute(job: JobReady, cancelled: threading.Event, started: float) -> Final:
        if job.job_id == 0:
            raise RuntimeError("a bug")
        product = Resource(url="data:,null", sha256=sha256_hex(b"null"), size=4)
        return JobFinished(job=job.ref, product=product, started_at=started, finished_at=started)

    runners = Runners("w0", 1, execute, box)
    runners.start()
    for job_id in (0, 1):
        runners.submit(Work(job_ready(job_id), threading.Event()))
    done: list[Done] = []
    while len(done) < 2:
        box.sleep(lambda timeout: woken.wait(timeout), TIMEOUT)
        woken.clear()
        reports = box.take()
        assert reports, "no report"
        done += [r for r in reports if isinstance(r, Done)]
        assert all(isinstance(r, Started | Done) for r in reports)
    assert [(d.work.job.job_id, d.final is None) for d in done] == [(0, True), (1, False)]
    assert runners.alive()
    runners.stop()


def test_an_instant_job_runs_on_the_submitting_thread_unless_others_wait() -> None:
    """An instant job with nothing queued is run by `submit` itself (no hand-off to a
    runner and back); queued behind another job, it waits its turn on a runner."""
    woken = threading.Event()
    box = Reports(woken.set)
    release = threading.Event()
    ran_on: dict[int, str] = {}

    def execute(job: JobReady, cancelled: threading.Event, started: float) -> Final:
        ran_on[job.job_id] = threading.current_thread().name
        if job.job_id == 1:  # holds the only runner while job 2 and 3 are submitted
            release.wait(TIMEOUT)
        product = Resource(url="data:,null", sha256=sha256_hex(b"null"), size=4)
        return JobFinished(job=job.ref, product=product, started_at=started, finished_at=started)

    runners = Runners("w0", 1, execute, box, instant=lambda job: job.job_id in (0, 3))
    runners.start()
    here = threading.current_thread().name
    runners.submit(Work(job_ready(0), threading.Event()))
    assert ran_on == {0: here}
    assert [type(r) for r in box.take()] == [Started, Done]  # reported, as a runner does
    runners.submit(Work(job_ready(1), threading.Event()))
    wait_for(lambda: 1 in ran_on, TIMEOUT, "job 1 never started")
    runners.submit(Work(job_ready(2), threading.Event()))  # not instant: queued
    runners.submit(Work(job_ready(3), threading.Event()))  # instant, but after job 2
    assert set(ran_on) == {0, 1}
    release.set()
    wait_for(lambda: 3 in ran_on, TIMEOUT, "job 3 never ran")
    assert ran_on[1] == ran_on[2] == ran_on[3] != here
    runners.stop()


def test_only_instant_operations_with_inline_inputs_are_instant(tmp_path: Path) -> None:
    store = ResourceStore(tmp_path.as_uri())
    jobs = Jobs("w0", store, TaskRunner(store, []), {}, Journal(None))
    inline = Resource(url="data:,null", sha256=sha256_hex(b"null"), size=4)
    stored = Resource(url=f"{tmp_path.as_uri()}/art1/0", sha256=sha256_hex(b"null"), size=4)
    assert jobs.instant(job_ready(0, inputs=[inline]))
    assert not jobs.instant(job_ready(0, inputs=[inline, stored]))  # a read could take long
    assert not jobs.instant(job_ready(0, operation=Operation(name="trail")))
    assert not jobs.instant(job_ready(0, operation=Operation(name="no-such-operation")))
    assert not jobs.instant(job_ready(0, kind="tasks"))


class _Probe(Executor):
    """Counts the calls a worker makes to its executors' setup and close."""

    name = "worker_test_probe"
    sites: ClassVar[list[Site]] = []
    closed: ClassVar[int] = 0

    def setup(self, site: Site) -> None:
        _Probe.sites.append(site)

    def run(self, run: TaskRun) -> TaskResult:
        return TaskResult(0, b"", b"")

    def close(self) -> None:
        _Probe.closed += 1


register_executor("worker_test_probe", _Probe)


def test_executors_are_set_up_and_closed_once(station: Station) -> None:
    agent = station.worker(executors=["worker_test_probe"])
    assert [(s.node, s.allow_code, s.state_dir) for s in _Probe.sites] == [
        ("w0", False, agent.config.state_dir)
    ]
    station.workers.remove(agent)
    agent.stop()
    assert (len(_Probe.sites), _Probe.closed) == (1, 1)
