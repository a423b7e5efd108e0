"""Retry policy: how long a failed attempt waits before the next, and how often a job
may lose its node before the artifact fails."""

from __future__ import annotations

import random
from dataclasses import dataclass

from flotta_mqtt.model import Job


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; the randomness is given, never global."""

    backoff: float
    backoff_max: float
    max_lost_attempts: int
    rng: random.Random

    def may_retry(self, job: Job, attempt: int) -> bool:
        """Whether a failed `attempt` of `job` gets another (its step says how many)."""
        return attempt <= job.retries

    def retry_at(self, now: float, attempt: int) -> float:
        """When the retry numbered `attempt` is dispatched: base * 2**(attempt - 1)
        seconds after `now`, at most the maximum, times a jitter in [0.5, 1)."""
        delay: float = min(self.backoff_max, self.backoff * 2.0 ** max(0, attempt - 1))
        return now + delay * self.rng.uniform(0.5, 1.0)

    def lost_too_often(self, times: int) -> bool:
        """Whether a job that lost its node `times` times is given up."""
        return times >= self.max_lost_attempts
