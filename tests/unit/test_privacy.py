"""Differential privacy on a worker, without a broker: the noise has the scale it states,
and the budget is spent once per job attempt, kept across restarts, and refused when short.

OpenDP's samplers draw from the operating system's randomness and cannot be seeded (that
is what makes them safe), so the statistical tests fix their sizes and a significance of
1e-6 instead: a correct sampler fails one run in a million, and a scale 10% off fails
every run (checked below against the same draws).
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from scipy import stats

from flotta_mqtt import analytics as operations
from flotta_mqtt.analytics import (
    BudgetExceeded,
    DatasetSpec,
    FileDataset,
    JobContext,
    PrivacyRefused,
    privacy,
)
from flotta_mqtt.analytics.privacy import Noise
from flotta_mqtt.model import Operation
from flotta_mqtt.protocol import JobFailed, JobFinished, JobReady
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker.jobs import Jobs
from flotta_mqtt.worker.journal import Journal
from flotta_mqtt.workflows.executors import TaskRunner

# The KS test tells a 10% wider Laplace apart at p < 1e-6 only with this many draws (at
# 20,000 its largest CDF gap, about 0.017, is within the critical 0.019: it failed 2 in 10).
DRAWS = 80_000
SIGNIFICANCE = 1e-6


def fits(draws: np.ndarray, distribution: stats.rv_continuous) -> bool:
    return bool(stats.kstest(draws, distribution.cdf).pvalue > SIGNIFICANCE)


def test_laplace_noise_has_the_scale_sensitivity_over_epsilon() -> None:
    noise = Noise(epsilon=0.5, delta=0.0)
    assert math.isclose(noise.scale(l1=3.0, l2=3.0), 3.0 / 0.5, rel_tol=1e-6)
    draws = np.asarray(noise.floats([0.0] * DRAWS, l1=3.0, l2=3.0))
    assert fits(draws, stats.laplace(scale=6.0))
    assert not fits(draws, stats.laplace(scale=6.6))  # the test can tell 10% off


def test_gaussian_noise_has_its_stated_scale_within_the_classic_bound() -> None:
    noise = Noise(epsilon=1.0, delta=1e-6)
    sigma = noise.scale(l1=1.0, l2=1.0)
    # zCDP's conversion is tighter than the classic sqrt(2 ln(1.25 / delta)) / epsilon.
    assert 1.0 < sigma < math.sqrt(2 * math.log(1.25 / 1e-6)) / 1.0
    draws = np.asarray(noise.floats([0.0] * DRAWS, l1=1.0, l2=1.0))
    assert fits(draws, stats.norm(scale=sigma))
    assert not fits(draws, stats.norm(scale=sigma * 1.1))


@pytest.mark.parametrize("epsilon", [1.0, 0.5, 1 / 3, 1 / 7, 1 / 56 * 0.999])
def test_threshold_counts_work_for_any_epsilon_and_keep_only_big_groups(epsilon: float) -> None:
    """1 / (1 / epsilon) exceeds epsilon in OpenDP's rounding for some (1/3, 1/56): the
    mechanism's scale must still keep within epsilon, not fail every such job."""
    noise = Noise(epsilon=epsilon, delta=1e-7)
    kept = privacy.threshold_counts({"one": 1, "many": 10**6}, noise, min_group_size=1)
    assert set(kept) == {"many"} and abs(kept["many"] - 10**6) < 50 / epsilon


def test_discrete_laplace_counts_have_the_stated_spread() -> None:
    noise = Noise(epsilon=0.25, delta=0.0)  # scale 4 on integers
    draws = np.asarray(noise.ints([100] * DRAWS, l1=1, l2=1)) - 100
    assert draws.dtype.kind == "i"
    # P(x) is proportional to exp(-|x| / 4): a chi-square test on |x| <= 12, the rest pooled.
    support = np.arange(-12, 13)
    weights = np.exp(-np.abs(support) / 4.0)
    total = weights.sum() + 2 * np.exp(-13 / 4.0) / (1 - np.exp(-1 / 4.0))
    expected = np.append(weights / total, 0.0) * DRAWS
    expected[-1] = DRAWS - expected[:-1].sum()
    observed = np.append([(draws == v).sum() for v in support], (np.abs(draws) > 12).sum())
    assert stats.chisquare(observed, expected).pvalue > SIGNIFICANCE


# --- the ledger, on a worker's Jobs and journal -------------------------------------------------


def site(tmp_path: Path, budget: float) -> tuple[Jobs, Journal, ResourceStore]:
    rows = np.random.default_rng(5).normal(10, 2, 300)
    path = tmp_path / "d.csv"
    pacsv.write_csv(pa.table({"y": rows}), path)
    spec = DatasetSpec.model_validate(
        {"paths": [path], "privacy": {"epsilon": budget, "delta": 1e-6}}
    )
    store = ResourceStore((tmp_path / "store").as_uri())
    journal = Journal(tmp_path / "state")
    jobs = Jobs("w0", store, TaskRunner(store, []), {"p": FileDataset("p", "w0", spec)}, journal)
    return jobs, journal, store


def count_job(job_id: int, attempt: int = 1, epsilon: float = 0.3) -> JobReady:
    return JobReady(
        artifact_id="a1",
        job_id=job_id,
        attempt=attempt,
        project="p",
        seed=1,
        step="0",
        kind="parallel",
        role="local",
        iteration=0,
        operation=Operation(name="count", params={"epsilon": epsilon}),
    )


def run(jobs: Jobs, job: JobReady) -> JobFinished | JobFailed:
    return jobs.run(job, threading.Event(), time.time())


def test_a_budget_is_spent_once_per_attempt_kept_across_restarts_and_refused_when_short(
    tmp_path: Path,
) -> None:
    jobs, journal, store = site(tmp_path, budget=1.0)
    first = run(jobs, count_job(1))
    assert isinstance(first, JobFinished)
    released = store.get(first.product)
    assert journal.spent("p") == (0.3, 0.0)
    # The same attempt again (a restart before its result was acknowledged, a duplicate):
    # the same bytes, paid once.
    journal.close()
    jobs, journal, store = site(tmp_path, budget=1.0)
    assert journal.spent("p") == (0.3, 0.0)  # the restart refunds nothing
    again = run(jobs, count_job(1))
    assert isinstance(again, JobFinished) and store.get(again.product) == released
    assert journal.spent("p") == (0.3, 0.0)
    # A new attempt is a new release: paid again.
    assert isinstance(run(jobs, count_job(1, attempt=2)), JobFinished)
    assert isinstance(run(jobs, count_job(2)), JobFinished)
    assert journal.spent("p") == pytest.approx((0.9, 0.0))
    refused = run(jobs, count_job(3))
    assert isinstance(refused, JobFailed) and refused.error.type == BudgetExceeded.__name__
    assert refused.error.message == (
        "worker w0: project p: this job asks epsilon 0.3 and delta 0, but the site's "
        "privacy budget has 0.1 and 1e-06 left (of 1 and 1e-06)"
    )
    assert journal.spent("p") == pytest.approx((0.9, 0.0))  # a refusal costs nothing
    assert isinstance(run(jobs, count_job(4, epsilon=0.1)), JobFinished)  # to the last part
    journal.close()


def test_a_job_that_fails_spends_nothing_and_a_worker_without_a_journal_refuses_noise(
    tmp_path: Path,
) -> None:
    jobs, journal, _ = site(tmp_path, budget=1.0)
    bad = count_job(1).model_copy(
        update={"operation": Operation(name="sum", params={"column": "nope", "epsilon": 0.5})}
    )
    assert isinstance(run(jobs, bad), JobFailed)
    assert journal.spent("p") == (0.0, 0.0)
    journal.close()
    memory = Journal(None)
    jobs.journal = memory
    failed = run(jobs, count_job(2))
    assert isinstance(failed, JobFailed) and failed.error.type == PrivacyRefused.__name__
    assert "keeps no journal on disk" in failed.error.message


def test_noised_results_say_what_made_them(tmp_path: Path) -> None:
    jobs, journal, store = site(tmp_path, budget=10.0)
    finished = run(jobs, count_job(1, epsilon=2.0))
    assert isinstance(finished, JobFinished)
    state = json.loads(store.get(finished.product))
    (noised,) = state
    assert isinstance(noised, int) and abs(noised - 300) < 40  # scale 0.5: 40 is 80 scales
    final = count_job(2, epsilon=2.0).model_copy(update={"role": "aggregate"})
    result = operations.run(JobContext(job=final, node="i", inputs=[state], data=None))
    assert result == {"value": noised, "mechanism": "laplace", "epsilon": 2.0, "delta": 0.0}
    journal.close()
