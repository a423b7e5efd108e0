"""Membership: which nodes take part in an artifact, and what a node's presence may claim.

With the operator's registry, an artifact binds to every holder registered for its project,
online or not (an offline one gets its jobs when it comes back); with a quorum, to the
holders online once enough of them are. Without a registry (a development set-up) the
holders are the workers heard from so far. Either way the status names who takes part
and who was left out, so a partial result is never silent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from flotta_mqtt.model import Artifact, JobState, Registry
from flotta_mqtt.protocol import NodePresence
from flotta_mqtt.scheduler.records import ArtifactRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Members:
    """The holders an artifact binds to, and the expected ones it leaves out."""

    holders: list[str]
    missing: list[str]


@dataclass(frozen=True)
class Waiting:
    """Why an artifact cannot bind yet (its quorum is not online), naming who is silent;
    `final` when its quorum asks for more holders than the registry has."""

    message: str
    final: bool = False


def admit(presence: NodePresence, registry: Registry | None, initiator: str) -> NodePresence | None:
    """A presence as the scheduler believes it: no more than the registry grants, or
    None for a node the registry does not know (it is given nothing)."""
    if presence.initiator:
        return presence if presence.node == initiator else None
    if registry is None:
        return presence
    entry = registry.workers.get(presence.node)
    if entry is None:
        return None
    allowed = registry.executors(presence.node)
    return presence.model_copy(
        update={
            "projects": [p for p in presence.projects if p in entry.projects],
            "executors": [e for e in presence.executors if e in allowed],
        }
    )


def serving(
    client: str, registry: Registry | None, nodes: Mapping[str, NodePresence]
) -> Mapping[str, NodePresence]:
    """The nodes that take part in `client`'s artifacts: those the registry lets serve its
    tenant (and the initiator); every node without a registry."""
    if registry is None:
        return nodes  # no copy: binding only reads it
    tenant = registry.tenant(client)
    return {
        name: node
        for name, node in nodes.items()
        if node.initiator or registry.serves(name, tenant)
    }


def expected_holders(
    artifact: Artifact, client: str, registry: Registry | None, nodes: Mapping[str, NodePresence]
) -> list[str]:
    """Who should hold an artifact's data: the holders the registry names for its owner's
    tenant, else those heard from."""
    if registry is not None:
        return registry.holders(artifact.project, registry.tenant(client))
    project = artifact.project
    return sorted(n.node for n in nodes.values() if not n.initiator and project in n.projects)


def quorum_size(quorum: int | float, expected: int) -> int:
    """How many holders a quorum asks for: a count, or a fraction of those expected."""
    if isinstance(quorum, float):
        return max(1, math.ceil(quorum * expected))
    return quorum


def members(
    artifact: Artifact, client: str, registry: Registry | None, nodes: Mapping[str, NodePresence]
) -> Members | Waiting:
    """Who `client`'s artifact binds to now, or why it must wait for more holders."""
    expected = expected_holders(artifact, client, registry, nodes)
    if artifact.quorum is None:
        return Members(expected, [])
    online = [name for name in expected if _online(nodes, name)]
    need = quorum_size(artifact.quorum, len(expected))
    if registry is not None and need > len(expected):
        return Waiting(
            f"quorum of {need} holders asked, but project {artifact.project} has "
            f"{len(expected)} registered holders",
            final=True,
        )
    if len(online) < need:
        silent = [name for name in expected if name not in online]
        return Waiting(
            f"quorum of {need} holders of project {artifact.project} not reached: "
            f"{len(online)} of {len(expected)} online; silent: {', '.join(silent) or 'none'}"
        )
    return Members(online, [name for name in expected if name not in online])


def waiting_on(
    record: ArtifactRecord, registry: Registry | None, nodes: Mapping[str, NodePresence]
) -> str:
    """Who an unfinished artifact still waits on, for the reason it fails at its deadline."""
    if record.context is None or record.graph is None:
        taking_part = members(record.artifact, record.client, registry, nodes)
        return taking_part.message if isinstance(taking_part, Waiting) else "not yet bound"
    unfinished = {
        record.worker(job_id)
        for job_id, status in enumerate(record.jobs)
        if status.state is not JobState.COMPLETED
    }
    silent = [
        name if _online(nodes, name) else f"{name} (offline)"
        for name in (w.id for w in record.context.workers)
        if name in unfinished
    ]
    if silent:
        return f"holders that did not answer: {', '.join(silent)}"
    return f"unfinished jobs on {', '.join(sorted(unfinished)) or 'no node'}"


def _online(nodes: Mapping[str, NodePresence], name: str) -> bool:
    node = nodes.get(name)
    return node is not None and node.online
