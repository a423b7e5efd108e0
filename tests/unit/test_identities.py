"""Broker identities: the generated ACL grants each node exactly its rights, secrets stay secret.

The ACL is parsed back here (mosquitto 2.0 `user`/`topic` syntax) and compared with a table
written by hand from the topic layout, then checked against the protocol's own topics.
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest

from flotta_mqtt.broker.identities import (
    IdentitySpec,
    generate_identities,
    load_credentials,
    render_acl,
)
from flotta_mqtt.protocol import topics

SPEC = IdentitySpec(
    scheduler="scheduler",
    workers=["node-1", "node-2"],
    workbenches=["alice"],
    dashboards=["dash"],
)

Rights = set[tuple[str, str]]  # (access, topic filter)
V = "flotta/+"
EXPECTED: dict[str, Rights] = {
    "scheduler": {
        ("read", f"{V}/requests/+/+"),
        ("read", f"{V}/events/+"),
        ("read", f"{V}/presence/+"),
        ("write", f"{V}/workers/+/jobs"),
        ("write", f"{V}/workers/+/control"),
        ("write", f"{V}/artifacts/#"),
        ("write", f"{V}/replies/+"),
        ("write", f"{V}/sessions/scheduler"),
    },
    "scheduler.initiator": {
        ("read", f"{V}/workers/scheduler.initiator/#"),
        ("write", f"{V}/events/scheduler.initiator"),
        ("write", f"{V}/presence/scheduler.initiator"),
        ("write", f"{V}/sessions/scheduler.initiator"),
    },
    "node-1": {
        ("read", f"{V}/workers/node-1/#"),
        ("write", f"{V}/events/node-1"),
        ("write", f"{V}/presence/node-1"),
        ("write", f"{V}/sessions/node-1"),
    },
    "node-2": {
        ("read", f"{V}/workers/node-2/#"),
        ("write", f"{V}/events/node-2"),
        ("write", f"{V}/presence/node-2"),
        ("write", f"{V}/sessions/node-2"),
    },
    "alice": {
        ("read", f"{V}/replies/alice"),
        ("read", f"{V}/artifacts/alice/#"),  # its own artifacts only
        ("read", f"{V}/presence/+"),
        ("read", "flotta/directory/v1/+"),  # which scheduler group serves a project
        ("write", f"{V}/requests/alice/+"),
        ("write", f"{V}/replies/alice"),  # the SDK's sync marker to itself
        ("write", f"{V}/sessions/alice"),
    },
    "dash": {
        ("read", f"{V}/artifacts/#"),  # without a registry, a dashboard watches everything
        ("read", f"{V}/presence/+"),
    },
}


# Each node whose process claims its identity has a probe (transport/claims.py): it reads
# the node's claim, and the presence its will updates, and writes its marker beside them.
PROBES: dict[str, Rights] = {
    f"{node}.probe": {
        ("read", f"{V}/sessions/{node}"),
        ("write", f"{V}/sessions/{node}"),
        *([("read", f"{V}/presence/{node}")] if presence else []),
    }
    for node, presence in [
        ("scheduler", False),
        ("scheduler.initiator", True),
        ("node-1", True),
        ("node-2", True),
        ("alice", False),
    ]
}
USERS = {**EXPECTED, **PROBES}


def parse_acl(text: str) -> dict[str | None, Rights]:
    """User → its rights, as mosquitto reads the file (None: lines before any `user`)."""
    acl: dict[str | None, Rights] = {None: set()}
    user: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword == "user":
            user = rest.strip()
            assert user not in acl, f"user {user} has two blocks"
            acl[user] = set()
        elif keyword == "topic":
            access, _, topic = rest.partition(" ")
            if access in ("read", "write", "readwrite"):
                accesses = ["read", "write"] if access == "readwrite" else [access]
            else:  # `topic FILTER` alone means readwrite
                accesses, topic = ["read", "write"], rest
            acl[user] |= {(a, topic.strip()) for a in accesses}
        else:
            pytest.fail(f"unexpected ACL line {line!r} (a `pattern` applies to every user)")
    return acl


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching, as the broker applies it; `#` also matches the parent level."""
    wanted, levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(wanted):
        if level == "#":
            return True
        if i >= len(levels) or level not in ("+", levels[i]):
            return False
    return len(wanted) == len(levels)


def allowed(acl: dict[str | None, Rights], user: str, access: str, topic: str) -> bool:
    return any(a == access and matches(f, topic) for a, f in acl[user])


def test_the_acl_grants_each_node_exactly_its_rights() -> None:
    acl = parse_acl(render_acl(SPEC))
    assert acl.pop(None) == set(), "anonymous clients must get nothing"
    assert acl == USERS


def test_the_acl_matches_the_protocol_topics() -> None:
    """Who may do what on the real topics of topics.py (a `+` level takes any version)."""
    acl = parse_acl(render_acl(SPEC))
    table = [
        # (user, access, topic, allowed)
        ("node-1", "read", topics.jobs("node-1"), True),
        ("node-1", "read", topics.control("node-1"), True),
        ("node-1", "read", topics.jobs("node-2"), False),
        ("node-1", "write", topics.jobs("node-2"), False),  # only the scheduler sends jobs
        ("node-1", "write", topics.jobs("node-1"), False),
        ("node-1", "write", topics.events("node-1"), True),
        ("node-1", "write", topics.events("node-2"), False),
        ("node-1", "write", topics.presence("node-1"), True),
        ("node-1", "write", topics.presence("node-2"), False),
        ("node-1", "read", topics.events("node-2"), False),
        ("node-1", "read", topics.status("alice", "a1"), False),
        ("node-1", "write", topics.submit("node-1"), False),
        ("scheduler.initiator", "read", topics.jobs("scheduler.initiator"), True),
        ("scheduler.initiator", "write", topics.events("scheduler.initiator"), True),
        ("scheduler.initiator", "write", topics.jobs("node-1"), False),
        ("scheduler", "write", topics.jobs("node-2"), True),
        ("scheduler", "write", topics.control("node-2"), True),
        ("scheduler", "write", topics.status("alice", "a1"), True),
        ("scheduler", "write", topics.locks("alice", "a1"), True),
        ("scheduler", "write", topics.reply("alice"), True),
        ("scheduler", "read", topics.submit("alice"), True),
        ("scheduler", "read", topics.cancel("alice"), True),
        ("scheduler", "read", topics.events("node-1"), True),
        ("scheduler", "read", topics.presence("node-1"), True),
        ("scheduler", "write", topics.events("node-1"), False),
        ("scheduler", "read", topics.jobs("node-1"), False),
        ("alice", "write", topics.submit("alice"), True),
        ("alice", "write", topics.cancel("alice"), True),
        ("alice", "write", topics.submit("bob"), False),
        ("alice", "write", topics.schedule("alice"), True),
        ("alice", "write", topics.schedule("bob"), False),
        ("node-1", "write", topics.schedule("node-1"), False),
        ("dash", "write", topics.schedule("dash"), False),
        ("scheduler", "read", topics.schedule("alice"), True),
        ("alice", "write", topics.reply("alice"), True),
        ("alice", "read", topics.reply("alice"), True),
        ("alice", "read", topics.reply("bob"), False),
        ("alice", "read", topics.status("alice", "a1"), True),
        ("alice", "read", topics.locks("alice", "a1"), True),
        ("alice", "read", topics.presence("node-1"), True),
        ("alice", "read", topics.status("bob", "b1"), False),  # another's artifact
        ("alice", "read", topics.locks("bob", "b1"), False),
        ("alice", "write", topics.status("alice", "a1"), False),
        ("alice", "write", topics.jobs("node-1"), False),
        ("alice", "read", topics.jobs("node-1"), False),
        ("dash", "read", topics.status("alice", "a1"), True),
        ("dash", "read", topics.locks("alice", "a1"), True),
        ("dash", "read", topics.presence("node-1"), True),
        ("dash", "write", topics.submit("dash"), False),
        ("dash", "read", topics.reply("dash"), False),
        ("dash", "write", topics.presence("dash"), False),
        # One identity, one process: a node claims itself; only its own probe reads it.
        ("node-1", "write", topics.session("node-1"), True),
        ("node-1", "write", topics.session("node-2"), False),
        ("node-1", "read", topics.session("node-1"), False),
        ("node-1.probe", "read", topics.session("node-1"), True),
        ("node-1.probe", "write", topics.session("node-1"), True),
        ("node-1.probe", "read", topics.presence("node-1"), True),
        ("node-1.probe", "read", topics.session("node-2"), False),
        ("node-1.probe", "write", topics.session("node-2"), False),
        ("node-1.probe", "read", topics.presence("node-2"), False),
        ("node-1.probe", "read", topics.jobs("node-1"), False),
        ("node-1.probe", "write", topics.presence("node-1"), False),
        ("node-1.probe", "write", topics.events("node-1"), False),
        ("scheduler.probe", "read", topics.session("scheduler"), True),
        ("scheduler.probe", "read", topics.session("scheduler.initiator"), False),
        ("scheduler.probe", "read", topics.events("node-1"), False),
        ("scheduler.initiator.probe", "read", topics.session("scheduler.initiator"), True),
        ("scheduler.initiator.probe", "read", topics.session("scheduler"), False),
        ("alice.probe", "read", topics.session("alice"), True),
        ("alice.probe", "write", topics.submit("alice"), False),
        ("scheduler", "read", topics.session("node-1"), False),
        ("dash", "read", topics.session("node-1"), False),
        ("dash", "write", topics.session("dash"), False),
    ]
    wrong = [row for row in table if allowed(acl, *row[:3]) != row[3]]
    assert wrong == []


def test_a_bridge_may_do_what_its_site_nodes_may_do() -> None:
    spec = IdentitySpec(
        workers=["node-1", "node-2"], workbenches=["alice"], bridges={"site-a": ["node-1"]}
    )
    acl = parse_acl(render_acl(spec))
    assert acl["site-a"] == acl["node-1"] | {
        ("write", "$SYS/broker/connection/bridge-site-a/state")
    }


@pytest.mark.parametrize(
    "spec",
    [
        IdentitySpec(workers=["node-1", "node-1"]),
        IdentitySpec(workers=["scheduler"]),
        IdentitySpec(workers=["scheduler.initiator"]),
        IdentitySpec(workers=["node-1", "node-1.probe"]),  # node-1's probe's identity
        IdentitySpec(workbenches=["scheduler.probe"]),
        IdentitySpec(workers=["n" * 123]),  # its probe's name would be over 128 characters
        IdentitySpec(workers=["node/1"]),
        IdentitySpec(workers=["node+"]),
        IdentitySpec(workbenches=["#"]),
        IdentitySpec(workers=["node 1"]),
        IdentitySpec(bridges={"site-a": ["node-9"]}),
    ],
)
def test_bad_or_repeated_names_are_refused(spec: IdentitySpec, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        render_acl(spec)
    with pytest.raises(ValueError):
        generate_identities(spec, tmp_path)


def test_generated_files_keep_their_secrets(tmp_path: Path) -> None:
    made = generate_identities(SPEC, tmp_path / "ids")
    assert set(made.credentials) == set(EXPECTED)
    passwords = [c.password for c in made.credentials.values()]
    assert len(set(passwords)) == len(passwords), "every node has its own password"
    assert all(len(p) >= 24 for p in passwords)

    acl_text = made.acl_file.read_text()
    password_text = made.password_file.read_text()
    for password in passwords:
        assert password not in acl_text
        assert password not in password_text  # hashed by mosquitto_passwd
    assert parse_acl(acl_text).keys() - {None} == set(USERS)
    hashed = dict(line.split(":", 1) for line in password_text.splitlines())
    assert set(hashed) == set(USERS)
    for user, value in hashed.items():  # a probe has its node's password
        assert accepts(value, made.credentials[user.removesuffix(".probe")].password), user

    for path in (made.credentials_file, made.password_file, made.acl_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    stored = json.loads(made.credentials_file.read_text())["nodes"]
    assert stored["node-1"] == {
        "role": "worker",
        "username": "node-1",
        "password": made.credentials["node-1"].password,
    }
    assert load_credentials(made.credentials_file) == made.credentials


def accepts(hashed: str, password: str) -> bool:
    """Whether a mosquitto_passwd hash (PBKDF2-SHA512, `$7$ROUNDS$SALT$HASH`) is of this
    password."""
    _, kind, rounds, salt, digest = hashed.split("$")
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(rounds))
    return kind == "7" and base64.b64encode(key).decode() == digest


def test_adding_a_node_keeps_every_other_password(tmp_path: Path) -> None:
    first = generate_identities(SPEC, tmp_path)
    grown = IdentitySpec(
        scheduler="scheduler",
        workers=["node-1", "node-2", "node-3"],
        workbenches=["alice"],
        dashboards=["dash"],
    )
    second = generate_identities(grown, tmp_path)
    assert set(second.credentials) == {*EXPECTED, "node-3"}
    for name in EXPECTED:
        assert second.credentials[name].password == first.credentials[name].password, name
    new = second.credentials["node-3"].password
    assert len(new) >= 24 and new not in {c.password for c in first.credentials.values()}
    assert load_credentials(second.credentials_file) == second.credentials
    hashed = dict(line.split(":", 1) for line in second.password_file.read_text().splitlines())
    assert set(hashed) == {*USERS, "node-3", "node-3.probe"}
    for path in (second.credentials_file, second.password_file, second.acl_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    # Rotating one node draws it a new password and leaves the others alone; a node left
    # out of the spec is dropped.
    third = generate_identities(SPEC, tmp_path, rotate=["node-1"])
    assert set(third.credentials) == set(EXPECTED)
    assert third.credentials["node-1"].password != first.credentials["node-1"].password
    assert third.credentials["node-2"].password == first.credentials["node-2"].password
    with pytest.raises(ValueError, match="not a node"):
        generate_identities(SPEC, tmp_path, rotate=["node-9"])
