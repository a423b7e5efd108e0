"""A real PostgreSQL server for tests and benches, as LocalBroker is a real mosquitto.

`start_postgres(folder)` runs Debian's server binaries (`postgresql` package) on a free
loopback port, its data and Unix socket in a folder of its own, with trust auth (nothing
leaves loopback, no password to keep) and durability off (a test's data dies with it).
It returns the URL of its `postgres` database and a stopper. initdb refuses to run as
root, so as root the server runs as the unprivileged `postgres` user (or `nobody`), in a
folder of /tmp that user owns: pytest's own folders are root's alone.

The fixtures: `postgres_server`, one server per session (a few seconds to start), and
`postgres_url`, a fresh database on it for each test (CREATE DATABASE: a few ms).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from flotta_mqtt.broker.local import free_port

BIN = Path(os.environ.get("FLOTTA_PG_BIN", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT = 30.0
SUPERUSER = "flotta"


def _as_unprivileged() -> tuple[list[str], int, int] | None:
    """The command prefix, uid and gid to run the server under when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        user = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    return prefix, user.pw_uid, user.pw_gid


def start_postgres(folder: Path) -> tuple[str, Callable[[], None]]:
    """Start a server with its data in `folder` (in a folder of /tmp when root); return
    the URL of its `postgres` database and a function that stops it and removes its data."""
    if not (BIN / "postgres").exists():
        pytest.fail(f"no PostgreSQL server in {BIN}: install Debian's `postgresql` package")
    unprivileged = _as_unprivileged()
    prefix: list[str] = []
    own = Path(folder)
    if unprivileged is not None:
        prefix, uid, gid = unprivileged
        own = Path(tempfile.mkdtemp(prefix="flotta-pg-"))
        os.chown(own, uid, gid)
    data, sockets = own / "data", own / "run"
    own.mkdir(parents=True, exist_ok=True)
    for command in (
        ["mkdir", str(data), str(sockets)],
        [str(BIN / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust"],
    ):
        subprocess.run([*prefix, *command], check=True, capture_output=True)
    port = free_port()
    settings = {
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(sockets),
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
    }
    options = [item for key, value in settings.items() for item in ("-c", f"{key}={value}")]
    log = open(own / "server.log", "ab")  # noqa: SIM115 - closed by the stopper
    server = subprocess.Popen(
        [*prefix, str(BIN / "postgres"), "-D", str(data), "-p", str(port), *options],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"

    def stop() -> None:
        # SIGQUIT: immediate shutdown. Its data is deleted next, so no shutdown checkpoint:
        # after a session's hundreds of CREATE DATABASE, fast shutdown (SIGINT) spent 15 s
        # or more writing them out.
        server.send_signal(signal.SIGQUIT)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(own, ignore_errors=True)

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return url, stop
        except psycopg.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop()
                raise RuntimeError(f"PostgreSQL did not start: see {own / 'server.log'}") from None
            time.sleep(0.05)


def create_database(server_url: str) -> str:
    """A new empty database on the server at `server_url`; its URL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One PostgreSQL server for the session; the URL of its `postgres` database."""
    url, stop = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield url
    finally:
        stop()


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh database for this test on the session's server."""
    return create_database(postgres_server)
