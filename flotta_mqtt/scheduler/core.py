"""The scheduler's core: a synchronous state machine with no threads and no I/O.

A burst of events (messages as they arrived, a reconnection, a tick) goes in with the
time it is handled at; what the core decided comes out as a `Decision`: the messages to
publish, the rows to write, the statuses to announce. The service around it owns the
bus, the repository and the clock. Policies (binding, retries, deadlines, re-sends) are
small modules it consults.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flotta_mqtt.logs import log_context
from flotta_mqtt.model import (
    ARTIFACT_FINAL,
    Artifact,
    ArtifactState,
    JobState,
    Registry,
    job_count,
)
from flotta_mqtt.model.ids import SAFE_ID
from flotta_mqtt.protocol import (
    CancelArtifact,
    NodePresence,
    ProtocolError,
    PruneRequest,
    StatusRequest,
    decode,
    topics,
    unbatch,
)
from flotta_mqtt.protocol.messages import RejectReason
from flotta_mqtt.protocol.topics import Address, Channel
from flotta_mqtt.scheduler.announcements import Announcements
from flotta_mqtt.scheduler.binding import Refused, bind_artifact
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.scheduler.deadlines import DeadlinePolicy
from flotta_mqtt.scheduler.dropouts import check_dropouts
from flotta_mqtt.scheduler.effects import (
    Clock,
    Connected,
    Decision,
    Event,
    InsertArtifact,
    Received,
    SaveNode,
    Tick,
)
from flotta_mqtt.scheduler.events import WorkerEvents
from flotta_mqtt.scheduler.groups import Served
from flotta_mqtt.scheduler.intake import message_ids, named_artifact, rejection
from flotta_mqtt.scheduler.jobs import JobFlow
from flotta_mqtt.scheduler.membership import (
    Waiting,
    admit,
    expected_holders,
    members,
    serving,
    waiting_on,
)
from flotta_mqtt.scheduler.metrics import Gauges, SchedulerMetrics
from flotta_mqtt.scheduler.quotas import Quotas
from flotta_mqtt.scheduler.records import ArtifactRecord
from flotta_mqtt.scheduler.resends import ResendPolicy
from flotta_mqtt.scheduler.retention import Retention
from flotta_mqtt.scheduler.retries import RetryPolicy
from flotta_mqtt.scheduler.running import check_running
from flotta_mqtt.scheduler.schedules import Schedules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policies:
    """The rules the core consults; a new kind of rule is a new module and a field here."""

    retries: RetryPolicy
    deadlines: DeadlinePolicy
    resends: ResendPolicy

    @classmethod
    def of(cls, config: SchedulerConfig, rng: random.Random) -> Policies:
        return cls(
            RetryPolicy(
                config.retry_backoff, config.retry_backoff_max, config.max_lost_attempts, rng
            ),
            DeadlinePolicy(config.heartbeat_grace, config.worker_grace, config.default_deadline),
            ResendPolicy(config.resend_interval),
        )


class SchedulerCore:
    """Artifacts, jobs and workers as the scheduler knows them; every change decided here.

    `restore` once with what the repository holds, then `handle` each burst. Handling
    one message either completes or leaves no write behind (an error in it is answered
    with a rejection where there is someone to answer).
    """

    def __init__(
        self,
        config: SchedulerConfig,
        metrics: SchedulerMetrics,
        policies: Policies,
        registry: Registry | None = None,
    ) -> None:
        self.initiator = config.initiator
        self.registry = registry  # None: nodes are who they say they are (development)
        self.policies = policies
        self.announcements = Announcements()
        self.quotas = Quotas(
            config.max_jobs_per_artifact, config.max_artifacts_in_flight, config.max_jobs_in_flight
        )
        self.flow = JobFlow(
            self.announcements,
            metrics,
            policies.retries,
            self.quotas,
            None if registry is None else registry.tenant,
        )
        self.artifacts: dict[str, ArtifactRecord] = {}  # unfinished, in memory
        self.events = WorkerEvents(self.artifacts, self.flow, self.announcements, policies.resends)
        self.retention = Retention(config, registry)
        self.served = Served.of(config, registry)
        self.schedules = Schedules(registry, self.served.refusal)
        self.nodes: dict[str, NodePresence] = {}
        # Every artifact id stored (and not pruned since) → its owner.
        self._known: dict[str, str] = {}
        self._started_at = 0.0

    # --- entry points -------------------------------------------------------------------

    def restore(
        self,
        nodes: Iterable[NodePresence],
        known: dict[str, str],
        finished: Mapping[str, float],
        unfinished: Iterable[ArtifactRecord],
        clock: Clock,
    ) -> Decision:
        """Take up what the repository holds (after a start, a crash or a restart):
        ready jobs are dispatched, dispatched and running ones asked about again; the
        final artifacts, with when they finished, wait for their prune."""
        decision = Decision()
        self.flow.begin(decision, clock)
        self._started_at = clock.monotonic
        self.nodes = {}
        for node in nodes:
            admitted = admit(node, self.registry, self.initiator)
            if admitted is not None:
                self.nodes[node.node] = admitted.model_copy(update={"online": False})
        self._known = known
        self.retention.restore(finished, clock.monotonic)
        now = clock.monotonic
        for record in unfinished:
            self.artifacts[record.id] = record
            holders = len(record.context.workers) if record.context else 1
            self.quotas.take(
                record.client, record.artifact, job_count(record.artifact.steps, holders)
            )
            self.announcements.changed(record.id)
            for job_id, status in enumerate(record.jobs):
                if record.state in ARTIFACT_FINAL:
                    break  # a job's message could not be built: see JobFlow.job_ready
                if status.state is JobState.READY:
                    self.flow.dispatch(record, job_id)
                elif status.state in (JobState.DISPATCHED, JobState.RUNNING):
                    # Whatever was said before the crash, ask again: workers answer a
                    # duplicate with what they know, and re-send their results.
                    record.attempts.dispatched_at[job_id] = now
                    if status.state is JobState.RUNNING:
                        # Its timeout and heartbeat grace count on from the restart.
                        record.attempts.started_at[job_id] = now
                        record.attempts.last_seen[job_id] = now
                    message = self.flow.job_ready(record, job_id)
                    if message is not None:
                        decision.publish.append(message)
        self._collect(clock, decision)
        return self.flow.end()

    def handle(self, events: Sequence[Event], clock: Clock) -> Decision:
        """Handle a burst of events at `clock`; what it decided."""
        decision = Decision()
        self.flow.begin(decision, clock)
        for event in events:
            if isinstance(event, Received):
                self._receive(event)
            elif isinstance(event, Connected):
                self._resend(self.policies.resends.to_resend(self.artifacts.values(), 0.0))
            elif isinstance(event, Tick):
                self._tick(clock)
        self.retention.prune(self._known, clock, decision)
        self._collect(clock, decision)
        return self.flow.end()

    def _collect(self, clock: Clock, decision: Decision) -> None:
        """The burst's announcements; the artifacts they end leave for the retention's care."""
        self.announcements.collect(self.artifacts, self._known, clock, decision)
        self.retention.ended(decision.statuses)

    def next_status_due(self) -> float | None:
        """When a folded status falls due (monotonic), if one waits."""
        return self.announcements.status_due

    def next_ack_due(self) -> float | None:
        """When pending acknowledgements fall due (monotonic), if any wait."""
        return self.announcements.acks_due

    def next_prune_due(self) -> float | None:
        """When pruning is due (monotonic; at once while a prune is under way), if ever."""
        return self.retention.due

    def snapshot(self) -> Gauges:
        """The present, for metrics (see Gauges.of)."""
        return Gauges.of(self.artifacts.values())

    # --- messages -------------------------------------------------------------------------

    def _receive(self, event: Received) -> None:
        self.flow.arrived = event.arrived
        try:
            address, message = decode(event.topic, event.payload)
        except ProtocolError as exc:
            log.error("scheduler rejected a message: %s", exc)
            self._reject(event.topic, str(exc), named_artifact(event.topic, event.payload))
            return
        writes = self.flow.decision.writes
        for part in unbatch(message):
            undo = len(writes)
            ids = message_ids(part)
            try:
                with log_context(**ids):
                    self._route(address, part)
            except Exception as exc:
                del writes[undo:]  # none of this message's writes, the burst's others kept
                log.exception("scheduler: error handling %s", event.topic)
                self._reject(event.topic, f"internal error: {exc}", ids.get("artifact_id"))

    def _reject(
        self, topic: str, error: str, artifact_id: str | None, reason: RejectReason = "invalid"
    ) -> None:
        """Answer a request that could not be handled, naming its artifact if it did."""
        answer = rejection(topic, error, artifact_id, reason)
        if answer is not None:
            self.flow.decision.publish.append(answer)

    def _route(self, address: Address, message: Any) -> None:
        if address.channel is Channel.SUBMIT:
            self._submit(message, client=address.name)
        elif address.channel in (Channel.CANCEL, Channel.ASK):
            self._about(address, message)
        elif address.channel is Channel.PRUNE:
            self._prune(address.name, message)
        elif address.channel is Channel.SCHEDULE:
            self.schedules.handle(address.name, message, self.flow.clock.wall, self.flow.decision)
        elif address.channel is Channel.PRESENCE:
            self._presence(address.name, message)
        elif address.channel is Channel.EVENTS:
            self.events.handle(address.name, message)
        else:
            log.error("scheduler: unexpected %s message", address.channel)

    def _submit(self, artifact: Artifact, client: str) -> None:
        owner = self._known.get(artifact.id)
        if owner == client:
            # A re-sent submission: answer with the current status, change nothing.
            self.announcements.changed(artifact.id)
            return
        if owner is not None:
            error = f"artifact ID {artifact.id} is taken: submit it under another ID"
            self._reject(topics.submit(client), error, artifact.id)
            return
        elsewhere = self.served.refusal(artifact.project)
        if elsewhere is not None:
            self._reject(topics.submit(client), elsewhere, artifact.id, "other_group")
            return
        tenant = None if self.registry is None else self.registry.tenant(client)
        if tenant is not None and not SAFE_ID.fullmatch(tenant):
            # A tenant is an id: its tasks' messages name it (the scope of their cache).
            error = (
                f"workbench {client!r} is not registered and its name is not an id (a letter "
                "or digit, then up to 127 of them or '_.-'): it cannot name a tenant"
            )
            self._reject(topics.submit(client), error, artifact.id, "forbidden")
            return
        holders = len(expected_holders(artifact, client, self.registry, self.nodes))
        jobs = job_count(artifact.steps, max(holders, 1))  # before anything is expanded
        refusal = self.quotas.refusal(client, artifact, jobs, holders)
        if refusal is not None:
            self._reject(topics.submit(client), refusal, artifact.id, "quota")
            return
        self.quotas.take(client, artifact, jobs)
        wall = self.flow.clock.wall
        self.flow.decision.writes.append(InsertArtifact(artifact, client, wall))
        self._known[artifact.id] = client
        record = ArtifactRecord(artifact, client, ArtifactState.SUBMITTED, 0, submitted_at=wall)
        self.artifacts[artifact.id] = record
        self.flow.metrics.artifact(ArtifactState.SUBMITTED)
        self.announcements.changed(artifact.id)
        self._try_bind(record)

    def _try_bind(self, record: ArtifactRecord) -> None:
        nodes = serving(record.client, self.registry, self.nodes)
        taking_part = members(record.artifact, record.client, self.registry, nodes)
        if isinstance(taking_part, Waiting):
            if taking_part.final:
                self.flow.fail(record, "QuorumUnreachable", taking_part.message)
            return  # a holder coming online, or the deadline, settles it
        outcome = bind_artifact(record.artifact, nodes, self.initiator, taking_part)
        if not isinstance(outcome, Refused):
            self.flow.run(record, outcome)
        elif outcome.final or not self.policies.deadlines.awaiting_workers(
            self._started_at, self.flow.clock.monotonic
        ):
            self.flow.fail(record, outcome.kind, outcome.message)
        # else: presence may still be arriving; a tick tries again

    def _bind_waiting(self) -> None:
        for record in list(self.artifacts.values()):
            if record.state is ArtifactState.SUBMITTED:
                self._try_bind(record)

    def _about(self, address: Address, request: CancelArtifact | StatusRequest) -> None:
        """A cancellation or a status request: answered with the artifact's status (after
        cancelling it if it runs), or at once with a rejection if it was never submitted."""
        artifact_id = request.artifact_id
        owner = self._known.get(artifact_id)
        if owner is None or not self._may_act(address.name, owner):
            # Another owner's artifact is not this requester's to know of.
            topic = topics.cancel(address.name)
            if isinstance(request, StatusRequest):
                topic = topics.ask(address.name)
            error = f"no such artifact ID {artifact_id}"
            self._reject(topic, error, artifact_id, "unknown_artifact")
            return
        record = self.artifacts.get(artifact_id)
        if record is not None and isinstance(request, CancelArtifact):
            self.flow.cancel(record, request.reason)
        self.announcements.changed(artifact_id)

    def _may_act(self, client: str, owner: str) -> bool:
        """Whether `client` may see or cancel `owner`'s artifact: its owner or an admin
        (anyone, without a registry)."""
        registry = self.registry
        return registry is None or client == owner or registry.is_admin(client)

    def _prune(self, client: str, request: PruneRequest) -> None:
        """An administrator's prune is under way from this burst on; anyone else's is refused."""
        if not self.retention.allowed(client):
            error = f"{client} may not prune: only the scheduler's admins may"
            self._reject(topics.prune(client), error, None, "forbidden")
            return
        self.retention.request(client, request.older_than, self.flow.clock.wall)

    def _presence(self, node: str, presence: NodePresence) -> None:
        if presence.node != node:
            log.error("scheduler: presence on %s names %s: ignored", node, presence.node)
            return
        admitted = admit(presence, self.registry, self.initiator)
        if admitted is None:
            log.warning("scheduler: presence of %s, which is not registered: ignored", node)
            return
        presence = admitted
        known = self.nodes.get(node)
        came_online = presence.online and not (known is not None and known.online)
        self.nodes[node] = presence
        self.flow.decision.writes.append(SaveNode(presence))
        if came_online:
            # The worker may have restarted and forgotten what it held: ask again for
            # everything it was given; it answers duplicates with what it knows.
            self._resend(
                self.policies.resends.to_resend(
                    self.artifacts.values(), 0.0, worker=node, include_accepted=True
                )
            )
            self._bind_waiting()

    def _resend(self, due: list[tuple[ArtifactRecord, int]]) -> None:
        for record, job_id in due:
            self.flow.resend(record, job_id)

    # --- timers ---------------------------------------------------------------------------

    def _tick(self, clock: Clock) -> None:
        for owner, run in self.schedules.fire(clock.wall, self.flow.decision):
            self._submit(run, owner)
        self._resend(
            self.policies.resends.to_resend(self.artifacts.values(), clock.caught_up, periodic=True)
        )
        self._bind_waiting()
        for record in list(self.artifacts.values()):
            overdue = self.policies.deadlines.overdue(
                record.artifact, record.submitted_at, clock.wall
            )
            if overdue is not None:
                waiting = waiting_on(record, self.registry, self.nodes)
                self.flow.fail(record, "DeadlineExceeded", f"{overdue}: {waiting}")
                continue
            if record.graph is None or record.state is not ArtifactState.RUNNING:
                continue
            retry_at = record.attempts.retry_at
            for job_id, due in list(retry_at.items()):
                if clock.monotonic >= due:
                    del retry_at[job_id]
                    self.flow.dispatch(record, job_id)
            if record.state is ArtifactState.RUNNING:  # not failed by a retry's dispatch
                check_running(
                    record, clock.monotonic, self.flow, self.policies, self.nodes, self.registry
                )
            if record.state is ArtifactState.RUNNING:
                check_dropouts(record, clock.monotonic, self.flow)
