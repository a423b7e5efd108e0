"""Retention: which finished artifacts are pruned, when, and who may ask for it.

A prune removes each artifact finished before its cutoff, whole: the core forgets the id
(it is then unknown like any other), the repository deletes its rows (`DeleteArtifact`),
and after the commit the service deletes its store objects and clears its retained
status (`Decision.pruned`). Unfinished artifacts are never candidates, however old. A
pruned id is forgotten: a submission of it, however late, is a new artifact.

Prunes run a batch per burst, so a large backlog never holds the scheduler thread (the
store deletes are on it) for long; a requester is answered once its prune is through.
With `prune_older_than` set, a prune runs at start and then every PERIOD seconds, or
every tenth of the retention if that is shorter: nothing outlives the retention by
more than one period.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice

from flotta_mqtt.model import ARTIFACT_FINAL, Registry
from flotta_mqtt.protocol import PruneReport, topics
from flotta_mqtt.protocol.messages import PRUNED_LISTED
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.scheduler.effects import Clock, Decision, DeleteArtifact
from flotta_mqtt.scheduler.records import ArtifactRecord

log = logging.getLogger(__name__)

BATCH = 100  # artifacts pruned per burst, at most
PERIOD = 3600.0  # seconds between periodic prunes, at most


def period(older_than: float) -> float:
    """Seconds between periodic prunes of artifacts finished `older_than` seconds ago."""
    return min(PERIOD, older_than / 10)


@dataclass
class Prune:
    """One prune under way: its cutoff (wall clock), who asked, what it removed so far."""

    older_than: float
    cutoff: float
    client: str | None  # None: the periodic prune, which reports to the log
    pruned: int = 0
    listed: list[str] = field(default_factory=list)

    def report(self) -> PruneReport:
        return PruneReport(older_than=self.older_than, pruned=self.pruned, artifact_ids=self.listed)


class Retention:
    """The finished artifacts and when each finished; the prunes under way."""

    def __init__(self, config: SchedulerConfig, registry: Registry | None) -> None:
        self.admins = frozenset(config.admins)
        self.registry = registry
        self.older_than = config.prune_older_than
        self.finished: dict[str, float] = {}  # final artifacts: when they finished (wall)
        self._prunes: deque[Prune] = deque()
        self._periodic_at: float | None = None  # when the next periodic prune is due

    def allowed(self, client: str) -> bool:
        """Whether `client` may prune: the one place that decides it (the scheduler's
        `admins`, and the registry's)."""
        registry = self.registry
        return client in self.admins or (registry is not None and registry.is_admin(client))

    def restore(self, finished: Mapping[str, float], now: float) -> None:
        """Take up the final artifacts stored; the periodic prune, if any, is due `now`."""
        self.finished = dict(finished)
        self._periodic_at = None if self.older_than is None else now

    def ended(self, statuses: Iterable[tuple[ArtifactRecord, float]]) -> None:
        """Note the artifacts whose final status the burst recorded, as of that status."""
        for record, wall in statuses:
            if record.state in ARTIFACT_FINAL:
                self.finished[record.id] = wall

    def request(self, client: str, older_than: float, wall: float) -> None:
        """An administrator's prune, of what finished `older_than` seconds before `wall`."""
        self._prunes.append(Prune(older_than, wall - older_than, client))

    @property
    def due(self) -> float | None:
        """When a burst has pruning to do (monotonic): at once while a prune is under way."""
        return 0.0 if self._prunes else self._periodic_at

    def prune(self, known: dict[str, str], clock: Clock, decision: Decision) -> None:
        """Prune the next batch: forget the ids (from `known` too), record the deletes in
        `decision`, and answer the prunes this batch completes."""
        self._periodic(clock)
        budget = BATCH
        while self._prunes and budget > 0:
            prune = self._prunes[0]
            # Oldest first (restored so, and noted as they end): the due ones lead.
            due = (i for i, at in self.finished.items() if at < prune.cutoff)
            chosen = list(islice(due, budget + 1))
            batch = chosen[:budget]
            for artifact_id in batch:
                del self.finished[artifact_id]
                owner = known.pop(artifact_id, None)
                decision.writes.append(DeleteArtifact(artifact_id))
                if owner is not None:
                    decision.pruned.append((owner, artifact_id))
            prune.pruned += len(batch)
            prune.listed += batch[: PRUNED_LISTED - len(prune.listed)]
            budget -= len(batch)
            if len(chosen) > len(batch):
                return  # the rest in the next burst
            self._prunes.popleft()
            if prune.client is not None:
                decision.publish.append((topics.reply(prune.client), prune.report(), False))
            elif prune.pruned:
                log.info(
                    "pruned %d artifacts finished over %g s ago", prune.pruned, prune.older_than
                )

    def _periodic(self, clock: Clock) -> None:
        """Start the periodic prune when it is due, unless the last one is still under way."""
        older_than, due = self.older_than, self._periodic_at
        if older_than is None or due is None or clock.monotonic < due:
            return
        self._periodic_at = clock.monotonic + period(older_than)
        if all(prune.client is not None for prune in self._prunes):
            self._prunes.append(Prune(older_than, clock.wall - older_than, None))
