"""Quotas: how large one artifact may be and how much one identity may have in flight,
checked at submission from the steps' formulas, before anything is expanded, so that a
small submission cannot make the scheduler build millions of jobs or one user starve
the others."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from flotta_mqtt.model import Artifact


@dataclass
class Quotas:
    max_jobs_per_artifact: int
    max_artifacts_in_flight: int  # per submitting identity
    max_jobs_in_flight: int  # per submitting identity
    _artifacts: Counter[str] = field(default_factory=Counter)
    _jobs: Counter[str] = field(default_factory=Counter)
    _counted: dict[str, tuple[str, int]] = field(default_factory=dict)  # id → client, jobs

    def refusal(self, client: str, artifact: Artifact, jobs: int, holders: int) -> str | None:
        """Why `client` may not submit `artifact` of `jobs` jobs now (over which limit), or
        None."""
        if jobs > self.max_jobs_per_artifact:
            return (
                f"artifact {artifact.id} would run {jobs} jobs over {holders} holders; "
                f"the scheduler takes at most {self.max_jobs_per_artifact} per artifact"
            )
        if self._artifacts[client] >= self.max_artifacts_in_flight:
            return (
                f"{client} has {self._artifacts[client]} artifacts in flight, the most it "
                "may: submit again when some have finished"
            )
        if self._jobs[client] + jobs > self.max_jobs_in_flight:
            return (
                f"{client} has {self._jobs[client]} jobs in flight and artifact "
                f"{artifact.id} would add {jobs}; at most {self.max_jobs_in_flight} "
                "per identity: submit again when some have finished"
            )
        return None

    def take(self, client: str, artifact: Artifact, jobs: int) -> None:
        """Count an unfinished artifact of `jobs` jobs against its identity."""
        self._counted[artifact.id] = (client, jobs)
        self._artifacts[client] += 1
        self._jobs[client] += jobs

    def release(self, artifact_id: str) -> None:
        """An artifact is over: it no longer counts."""
        counted = self._counted.pop(artifact_id, None)
        if counted is None:
            return
        client, jobs = counted
        self._artifacts[client] -= 1
        self._jobs[client] -= jobs
        if not self._artifacts[client]:
            del self._artifacts[client], self._jobs[client]
