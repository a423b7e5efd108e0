"""A site broker bridged to the central one, so a site keeps working while its WAN is down.

Workers at a site connect to their site broker; the scheduler to the central broker. The
site's mosquitto holds one bridge connection to central. While the link is down, local
clients keep talking to the site broker, and each side queues what the other should get:
the site for its bridge's local session, central for the bridge's persistent session.

Why MQTT 3.1.1 on the bridge: mosquitto 2.0.11 sends a v5 bridge's CONNECT with no session
expiry interval, so central drops the bridge's session at every disconnect and loses what
was published for the site during an outage. A 3.1.1 `cleansession false` session lasts.
`try_private` tells central that the client is a bridge: it keeps the retain flag and sends
nothing back to the bridge that came from it (no loops on `both` topics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flotta_mqtt.broker.identities import ANY_VERSION, NAME, Role, bridge_client_id
from flotta_mqtt.protocol import topics

Direction = Literal["in", "out", "both"]  # seen from the site: in = central → site


@dataclass(frozen=True, slots=True)
class BridgeTopic:
    pattern: str  # an MQTT filter, the same on both brokers
    direction: Direction
    qos: int = 1


V = ANY_VERSION
# Everything any site's nodes exchange with central, by the layout of protocol/topics.py.
# Prefer `site_topics`: central drops the bridge's connection for every message its
# identity may not publish, so a bridge should forward only its own nodes' topics.
SITE_TOPICS: tuple[BridgeTopic, ...] = (
    BridgeTopic(f"{V}/events/+", "out"),  # workers' events → scheduler
    BridgeTopic(f"{V}/requests/+/+", "out"),  # workbenches' submissions
    BridgeTopic(f"{V}/presence/+", "both"),  # its nodes' presence, and everyone else's
    BridgeTopic(f"{V}/workers/+/+", "in"),  # jobs and control for workers
    BridgeTopic(f"{V}/replies/+", "in"),  # rejections for workbenches
    BridgeTopic(f"{V}/artifacts/#", "in"),  # statuses and lock releases (retained)
)


def site_topics(nodes: Mapping[str, Role]) -> list[BridgeTopic]:
    """Bridge topics for exactly these nodes at the site (name → role), as their ACL reads.

    Nothing else crosses the link: a stray local message is never forwarded to central
    (which would drop the bridge for it), and central sends only what the site needs.
    """
    out: list[BridgeTopic] = []
    into: list[BridgeTopic] = []
    for name, role in nodes.items():
        if role in (Role.WORKER, Role.INITIATOR):
            out += [BridgeTopic(f"{V}/events/{name}", "out")]
            out += [BridgeTopic(f"{V}/presence/{name}", "out")]
            into += [BridgeTopic(f"{V}/workers/{name}/+", "in")]
        elif role is Role.WORKBENCH:
            out += [BridgeTopic(f"{V}/requests/{name}/+", "out")]
            into += [BridgeTopic(f"{V}/replies/{name}", "in")]
            into += [BridgeTopic(f"{V}/artifacts/{name}/#", "in")]
        elif role is not Role.DASHBOARD:
            raise ValueError(f"{name} ({role.value}) does not sit behind a site bridge")
    if Role.DASHBOARD in nodes.values():  # central's ACL delivers what it may watch
        into += [BridgeTopic(f"{V}/artifacts/#", "in")]
    if any(role in (Role.WORKBENCH, Role.DASHBOARD) for role in nodes.values()):
        into += [BridgeTopic(f"{V}/presence/+", "in")]
    if Role.WORKBENCH in nodes.values():  # which scheduler group serves each project
        into += [BridgeTopic(topics.directory("+"), "in")]
    return out + into


def render_bridge(
    name: str,
    remote_host: str,
    remote_port: int,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    topics: Sequence[BridgeTopic] = SITE_TOPICS,
    restart_timeout: tuple[int, int] = (2, 30),
    keepalive: int = 15,
) -> str:
    """A mosquitto `connection` block bridging this (site) broker to the central broker.

    `username`/`password` are the site's bridge identity on central (`identities` role
    `bridge`); `ca_file` turns TLS on, checking central's certificate against it.
    `restart_timeout` is the reconnect backoff (first, cap) in seconds.
    """
    if not NAME.fullmatch(name):
        raise ValueError(f"{name!r} cannot name a bridge: use letters, digits, '.', '_', '-'")
    if (cert_file is None) != (key_file is None) or (cert_file and ca_file is None):
        raise ValueError("a client certificate needs its key and the CA of the central broker")
    if password is not None and username is None:
        raise ValueError("a bridge password needs its username")
    client_id = bridge_client_id(name)
    lines = [
        f"# Bridge {name} → central, rendered by `python -m flotta_mqtt.broker bridge`.",
        f"connection {name}",
        f"address {remote_host}:{remote_port}",
        "# 3.1.1: 2.0.11 gives a v5 bridge no session expiry, so central would not queue.",
        "bridge_protocol_version mqttv311",
        "try_private true",
        f"remote_clientid {client_id}",
        f"local_clientid {client_id}.local",
        "# Persistent sessions on both sides: each queues for the other while the WAN is down.",
        "cleansession false",
        "local_cleansession false",
        "start_type automatic",
        f"restart_timeout {restart_timeout[0]} {restart_timeout[1]}",
        f"keepalive_interval {keepalive}",
        f"# Link state: '1'/'0' (retained, and a will on central) on $SYS/broker/connection/"
        f"{client_id}/state.",
        "notifications true",
    ]
    if username is not None:
        lines.append(f"remote_username {username}")
    if password is not None:
        lines.append(f"remote_password {password}")
    if ca_file is not None:
        lines += [f"bridge_cafile {ca_file}", "bridge_insecure false"]
    if cert_file is not None:
        lines += [f"bridge_certfile {cert_file}", f"bridge_keyfile {key_file}"]
    if tuple(topics) == SITE_TOPICS:
        lines.append(
            "# Every site's topics. Central drops the link for each message this identity may"
            " not publish:\n# prefer the site's own (`bridge --credentials`, `site_topics`)."
        )
    lines += [f"topic {t.pattern} {t.direction} {t.qos}" for t in topics]
    return "\n".join(lines) + "\n"
