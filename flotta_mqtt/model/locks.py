"""Which jobs are ready: the lock table, kept incrementally as jobs complete."""

from __future__ import annotations

from collections.abc import Iterable

from flotta_mqtt.model.binding import JobGraph


class LockTable:
    """Counts the unreleased locks on each job, so readiness costs O(successors) per event.

    Built from the graph and the jobs already completed (a scheduler resuming from its
    database), it never scans every lock again.
    """

    def __init__(self, graph: JobGraph, completed: Iterable[int] = ()) -> None:
        self._graph = graph.graph
        self.completed: set[int] = set(completed)
        self._held = {
            job: sum(1 for p in self._graph.predecessors(job) if p not in self.completed)
            for job in self._graph.nodes
        }

    def ready(self) -> list[int]:
        """Jobs not completed whose locks are all released, in job order."""
        return sorted(j for j, held in self._held.items() if held == 0 and j not in self.completed)

    def held(self, job: int) -> int:
        return self._held[job]

    def release(self, job: int) -> list[int]:
        """Record `job` completed; return the jobs this made ready. Idempotent."""
        if job in self.completed:
            return []
        self.completed.add(job)
        unlocked = []
        for successor in self._graph.successors(job):
            self._held[successor] -= 1
            if self._held[successor] == 0:
                unlocked.append(successor)
        return sorted(unlocked)
