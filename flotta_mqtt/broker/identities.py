"""Broker identities: one username and password per node, and an ACL that follows the topics.

Each node's rights are written out per user (no `pattern` lines), so the ACL file says
exactly who may do what. The topic layout is `flotta_mqtt.protocol.topics`; the protocol
version level is `+` so that two protocol versions can share one broker.

Mosquitto 2.0 grants every SUBSCRIBE under an `acl_file` and filters at delivery, so a
read right decides what a node receives, not what it may subscribe to.

A node whose process claims its identity (transport/claims.py) also gets a probe
identity, `NAME.probe`, with the node's password: the broker makes a username its
client id, so the probe that checks, before the node connects, that no other process
holds NAME needs a username of its own. It may only read NAME's claim and presence and
write its own marker beside the claim.

Scheduler groups (the registry's `groups`): a group's scheduler, its initiator and its
workers get their rights in their group's namespace alone (`flotta/v1-{group}`; the
default group's in `flotta/v1`), and a scheduler writes the directory entries of its
projects only; workbenches and dashboards keep `flotta/+`, every group's, and read the
directory.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

from flotta_mqtt.model import Registry
from flotta_mqtt.protocol import topics
from flotta_mqtt.transport.claims import probe_username
from flotta_mqtt.transport.settings import BrokerSettings

Access = Literal["read", "write"]
# A username is also a topic level in its rights: no `/`, `+`, `#` or spaces.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ANY_VERSION = "flotta/+"
BROKER_USER = "mosquitto"  # the user a root-started mosquitto drops to

PASSWORD_FILE = "passwd"
ACL_FILE = "acl"
CREDENTIALS_FILE = "credentials.json"


class Role(StrEnum):
    """What a node does, which decides its rights."""

    SCHEDULER = "scheduler"
    INITIATOR = "initiator"  # the scheduler's own worker, "<scheduler>.initiator"
    WORKER = "worker"
    WORKBENCH = "workbench"
    DASHBOARD = "dashboard"
    BRIDGE = "bridge"  # a site broker's bridge: the rights of the nodes it carries


# Roles whose processes claim their identity, and so have a probe identity (the
# dashboard runs in a browser, a bridge inside mosquitto).
CLAIMING = (Role.SCHEDULER, Role.INITIATOR, Role.WORKER, Role.WORKBENCH)


@dataclass(frozen=True, slots=True)
class Right:
    access: Access
    topic: str  # an MQTT filter; `#` also matches its parent level


@dataclass
class IdentitySpec:
    """The nodes of a deployment, by role. Names are usernames and client ids.

    `bridges` maps a site bridge's name to the nodes behind it (at that site): on the
    central broker the bridge may do exactly what those nodes may do.
    """

    scheduler: str | None = "scheduler"
    group_schedulers: list[str] = field(default_factory=list)  # one per scheduler group
    workers: list[str] = field(default_factory=list)
    workbenches: list[str] = field(default_factory=list)
    dashboards: list[str] = field(default_factory=list)
    bridges: dict[str, list[str]] = field(default_factory=dict)
    # With a registry, who may watch whose artifacts follows its tenants and admins;
    # without one, a dashboard watches every artifact.
    registry: Registry | None = None

    @classmethod
    def of(cls, registry: Registry) -> IdentitySpec:
        """The identities of the nodes an operator's registry names."""
        return cls(
            scheduler=registry.scheduler,
            group_schedulers=[entry.scheduler for entry in registry.groups.values()],
            workers=list(registry.workers),
            workbenches=list(registry.workbenches),
            dashboards=list(registry.dashboards),
            bridges={name: list(nodes) for name, nodes in registry.bridges.items()},
            registry=registry,
        )

    def nodes(self) -> list[tuple[str, Role]]:
        """Every identity to create, in file order; raises ValueError on a bad or repeated name."""
        nodes: list[tuple[str, Role]] = []
        for scheduler in [self.scheduler, *self.group_schedulers]:
            if scheduler is not None:
                nodes += [(scheduler, Role.SCHEDULER), (initiator(scheduler), Role.INITIATOR)]
        nodes += [(name, Role.WORKER) for name in self.workers]
        nodes += [(name, Role.WORKBENCH) for name in self.workbenches]
        nodes += [(name, Role.DASHBOARD) for name in self.dashboards]
        nodes += [(name, Role.BRIDGE) for name in self.bridges]
        seen: set[str] = set()
        probes = [probe_username(name) for name, role in nodes if role in CLAIMING]
        for name in [name for name, _ in nodes] + probes:
            if not NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} cannot be a broker identity: use letters, digits, '.', '_', '-'"
                    " (and at most 122 characters: NAME.probe is an identity too)"
                )
            if name in seen:
                raise ValueError(
                    f"{name!r} is named twice: each node needs its own identity, and "
                    "NAME.probe is the identity of NAME's probe"
                )
            seen.add(name)
        roles = dict(nodes)
        for bridge, carried in self.bridges.items():
            for name in carried:
                if roles.get(name) in (None, Role.BRIDGE):
                    raise ValueError(f"bridge {bridge!r} carries {name!r}, which is not a node")
        return nodes


def initiator(scheduler: str) -> str:
    """The identity of the initiator the scheduler runs (SchedulerConfig.initiator)."""
    return f"{scheduler}.initiator"


def rights(role: Role, name: str, spec: IdentitySpec | None = None) -> list[Right]:
    """What a node of this role and name may read and write."""
    registry = spec.registry if spec is not None else None
    v = ANY_VERSION
    if registry is not None and registry.groups:  # a node of one group: its namespace only
        v = topics.root(registry.node_group(name))
    if role in (Role.WORKER, Role.INITIATOR):
        return [
            Right("read", f"{v}/workers/{name}/#"),
            Right("write", f"{v}/events/{name}"),
            Right("write", f"{v}/presence/{name}"),
            Right("write", f"{v}/sessions/{name}"),
        ]
    if role is Role.SCHEDULER:
        # Only the scheduler writes job-ready messages, control, replies and statuses.
        return [
            Right("read", f"{v}/requests/+/+"),
            Right("read", f"{v}/events/+"),
            Right("read", f"{v}/presence/+"),
            Right("write", f"{v}/workers/+/jobs"),
            Right("write", f"{v}/workers/+/control"),
            Right("write", f"{v}/artifacts/#"),
            Right("write", f"{v}/replies/+"),
            Right("write", f"{v}/sessions/{name}"),
            *(Right("write", topics.directory(p)) for p in _served(registry, name)),
        ]
    v = ANY_VERSION  # workbenches and dashboards: every group's
    if role is Role.WORKBENCH:
        # It reads its own artifacts' topics (all of them if it administers), and writes its
        # own reply topic too: the SDK syncs on a marker sent to itself.
        admin = registry is not None and registry.is_admin(name)
        return [
            Right("read", f"{v}/replies/{name}"),
            Right("read", f"{v}/artifacts/#" if admin else f"{v}/artifacts/{name}/#"),
            Right("read", f"{v}/presence/+"),
            Right("read", topics.directory("+")),
            Right("write", f"{v}/requests/{name}/+"),
            Right("write", f"{v}/replies/{name}"),
            Right("write", f"{v}/sessions/{name}"),
        ]
    if role is Role.DASHBOARD:
        if registry is None:
            return [Right("read", f"{v}/artifacts/#"), Right("read", f"{v}/presence/+")]
        entry = registry.dashboards.get(name)
        tenants = entry.tenants if entry is not None else []
        owners = sorted({m for tenant in tenants for m in registry.members(tenant)})
        watched = [Right("read", f"{v}/artifacts/{owner}/#") for owner in owners]
        return [*watched, Right("read", f"{v}/presence/+")]
    if role is Role.BRIDGE:
        if spec is None:
            raise ValueError("a bridge's rights are those of its nodes: pass the spec")
        roles = dict(spec.nodes())
        union: list[Right] = []
        for node in spec.bridges[name]:
            union += [r for r in rights(roles[node], node, spec) if r not in union]
        # Its link state (mosquitto `notifications`) as a retained message and will.
        return [*union, Right("write", f"$SYS/broker/connection/{bridge_client_id(name)}/state")]
    raise ValueError(f"unknown role {role!r}")


def _served(registry: Registry | None, scheduler: str) -> list[str]:
    """The projects whose directory entries a group's scheduler writes."""
    groups = registry.groups.values() if registry is not None else []
    return next((entry.projects for entry in groups if entry.scheduler == scheduler), [])


def probe_rights(role: Role, name: str) -> list[Right]:
    """What the probe of node `name` may do: read its claim (and its presence, which its
    will updates), and write its own marker beside the claim."""
    v = ANY_VERSION
    readable = [f"{v}/presence/{name}"] if role in (Role.WORKER, Role.INITIATOR) else []
    return [
        Right("read", f"{v}/sessions/{name}"),
        Right("write", f"{v}/sessions/{name}"),
        *(Right("read", topic) for topic in readable),
    ]


def bridge_client_id(name: str) -> str:
    """The client id a site's bridge uses on the central broker (its persistent session)."""
    return f"bridge-{name}"


def render_acl(spec: IdentitySpec) -> str:
    """The text of a mosquitto 2.0 `acl_file` for these nodes: one `user` block per node."""
    lines = [
        "# flotta_mqtt broker ACL, generated by `python -m flotta_mqtt.broker identities`.",
        "# One block per node; no `pattern` lines, so each block is all that user may do.",
        "# Anonymous clients (no `user` line above their rights) get nothing.",
    ]
    for name, role in spec.nodes():
        lines += ["", f"# {role.value}", f"user {name}"]
        lines += [f"topic {right.access} {right.topic}" for right in rights(role, name, spec)]
        if role in CLAIMING:
            lines += ["", f"# the probe of {name}", f"user {probe_username(name)}"]
            lines += [f"topic {right.access} {right.topic}" for right in probe_rights(role, name)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Credential:
    node: str
    role: Role
    username: str
    password: str
    carries: dict[str, Role] = field(default_factory=dict)  # a bridge's nodes: name → role


@dataclass
class Identities:
    """The generated files, and each node's credentials."""

    password_file: Path
    acl_file: Path
    credentials_file: Path
    credentials: dict[str, Credential]

    def broker_settings(self, node: str, url: str, ca_file: Path | None = None) -> BrokerSettings:
        """How `node` connects to the broker at `url` with its identity."""
        credential = self.credentials[node]
        return BrokerSettings(
            url=url,
            username=credential.username,
            password=credential.password,
            ca_file=str(ca_file) if ca_file is not None else None,
        )


def generate_identities(
    spec: IdentitySpec, out_dir: Path, rotate: Iterable[str] = ()
) -> Identities:
    """Write a password file, an ACL and a credentials file (0600) for these nodes.

    A node already in `out_dir`'s credentials file keeps its password, so adding a node
    changes no other node's configuration; new nodes, and those named in `rotate`, get a
    new one drawn. Nodes no longer in the spec are dropped. The password and ACL files are
    made readable by the broker only (see `broker_readable`); the credentials file by its
    owner only.
    """
    nodes = spec.nodes()
    roles = dict(nodes)
    out_dir.mkdir(parents=True, exist_ok=True)
    credentials_file = out_dir / CREDENTIALS_FILE
    kept = load_credentials(credentials_file) if credentials_file.exists() else {}
    for name in set(rotate):
        if name not in roles:
            raise ValueError(f"cannot rotate {name!r}: it is not a node of this deployment")
        kept.pop(name, None)
    credentials = {
        name: Credential(
            name,
            role,
            name,
            kept[name].password if name in kept else secrets.token_urlsafe(24),
            {node: roles[node] for node in spec.bridges.get(name, [])},
        )
        for name, role in nodes
    }
    password_file = out_dir / PASSWORD_FILE
    _write_password_file(password_file, credentials.values())
    acl_file = out_dir / ACL_FILE
    acl_file.write_text(render_acl(spec))
    broker_readable(password_file, acl_file)
    document: dict[str, dict[str, object]] = {
        name: {"role": c.role.value, "username": c.username, "password": c.password}
        for name, c in credentials.items()
    }
    for name, c in credentials.items():
        if c.carries:
            document[name]["carries"] = {node: role.value for node, role in c.carries.items()}
    write_private(credentials_file, json.dumps({"nodes": document}, indent=2) + "\n")
    return Identities(password_file, acl_file, credentials_file, credentials)


def load_credentials(path: Path) -> dict[str, Credential]:
    """Read back a credentials file written by `generate_identities`."""
    nodes = json.loads(path.read_text())["nodes"]
    return {
        name: Credential(
            name,
            Role(entry["role"]),
            entry["username"],
            entry["password"],
            {node: Role(role) for node, role in entry.get("carries", {}).items()},
        )
        for name, entry in nodes.items()
    }


def _write_password_file(path: Path, credentials: Iterable[Credential]) -> None:
    """Hash with `mosquitto_passwd -U`: the plain passwords never appear on a command line.
    A probe identity has its node's password."""
    binary = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(binary).exists():
        raise FileNotFoundError("mosquitto_passwd is not installed (Debian: mosquitto)")
    users = [(c.username, c.password) for c in credentials]
    users += [(probe_username(c.username), c.password) for c in credentials if c.role in CLAIMING]
    write_private(path, "".join(f"{user}:{password}\n" for user, password in users))
    result = subprocess.run([binary, "-U", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        path.unlink(missing_ok=True)  # it still holds plain passwords
        raise RuntimeError(f"mosquitto_passwd failed: {result.stderr.strip() or result.stdout}")


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from its first byte on."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        os.fchmod(file.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        file.write(text)


def broker_readable(*paths: Path) -> None:
    """Let the broker, and no one else, read these files (0600, owned by the broker's user).

    Started as root, mosquitto drops to user `mosquitto` before it reads them, so as root
    they are handed to that user (later 2.0 releases also warn about any other owner).
    Run as another user, the broker runs as that user too, who owns them already.
    """
    owner = broker_user() if os.geteuid() == 0 else None
    for path in paths:
        if owner is not None:
            os.chown(path, *owner)
        path.chmod(0o600)


def broker_user() -> tuple[int, int] | None:
    """The uid and gid of the user a root-started mosquitto drops to, if it exists."""
    try:
        entry = pwd.getpwnam(BROKER_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid
