"""Render a mosquitto config that avoids known mosquitto traps, and run it on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from flotta_mqtt.broker.identities import broker_user, write_private

# Traps of mosquitto 2.0 that the rendered config avoids (costs in bench/README.md):
# - Nagle's algorithm delays every QoS 1 hop: set_tcp_nodelay.
# - max_queued_messages (default 1000) silently drops messages for offline sessions:
#   no count limit, bounded by bytes instead.
# - a crash loses everything since the last autosave (default 1800 s). Saving on every
#   change caps the broker's throughput, so it saves every few seconds instead: nodes
#   acknowledge jobs and results at application level and re-send what a crash lost.
BASE_CONFIG = """\
# flotta_mqtt broker config, rendered by `python -m flotta_mqtt.broker`.
per_listener_settings false
set_tcp_nodelay true
max_queued_messages 0
max_queued_bytes {max_queued_bytes}
max_inflight_messages 100
message_size_limit {message_size_limit}
persistence {persistence}
persistence_location {data_dir}/
autosave_interval 5
log_dest stderr
log_type error
log_type warning
log_type notice
connection_messages true
"""


@dataclass
class MosquittoSettings:
    """What a rendered broker config needs to know."""

    port: int
    data_dir: Path
    bind_address: str = "127.0.0.1"
    persistence: bool = True
    max_queued_bytes: int = 512 * 1024 * 1024
    message_size_limit: int = 1024 * 1024
    password_file: Path | None = None
    acl_file: Path | None = None
    # TLS on the listener: certfile and keyfile together; cafile checks client certificates.
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    require_certificate: bool = False
    use_identity_as_username: bool = False  # a client certificate's CN is its username
    bridges: list[str] = field(default_factory=list)  # bridge blocks, from bridge.render_bridge
    extra: list[str] = field(default_factory=list)
    # A second listener speaking MQTT over WebSockets, for browsers (the dashboard); with TLS
    # settings it uses the same certificate (wss://). mosquitto 2.0.11 needs the TCP
    # listener beside it: alone, it exits with "Unable to start any listening sockets".
    # It listens on loopback unless told otherwise, whatever the TCP listener binds.
    websockets_port: int | None = None
    websockets_bind_address: str = "127.0.0.1"

    @property
    def tls(self) -> bool:
        return self.certfile is not None


def render_config(settings: MosquittoSettings) -> str:
    """Return the text of a mosquitto.conf for these settings."""
    text = BASE_CONFIG.format(
        max_queued_bytes=settings.max_queued_bytes,
        message_size_limit=settings.message_size_limit,
        persistence="true" if settings.persistence else "false",
        data_dir=settings.data_dir,
    )
    text += f"\nlistener {settings.port} {settings.bind_address}\n"
    text += _render_tls(settings)
    if settings.websockets_port is not None:
        if settings.websockets_port == settings.port:
            raise ValueError(
                f"the WebSockets listener needs a port of its own: {settings.port} is the "
                "MQTT listener's"
            )
        # Listener options follow their `listener` line; the rest stays global
        # (per_listener_settings false), so identities and the ACL apply here too.
        bind = settings.websockets_bind_address
        text += f"listener {settings.websockets_port} {bind}\nprotocol websockets\n"
        text += _render_tls(settings)
    if settings.password_file is None:
        text += "allow_anonymous true\n"
    else:
        text += f"allow_anonymous false\npassword_file {settings.password_file}\n"
    if settings.acl_file is not None:
        # A node's session is named by its identity: another node's valid password must not
        # let it connect under this node's client id and take over its queued jobs.
        text += f"acl_file {settings.acl_file}\nuse_username_as_clientid true\n"
    for bridge in settings.bridges:
        text += "\n" + bridge.rstrip("\n") + "\n"
    return text + "".join(line + "\n" for line in settings.extra)


def _render_tls(settings: MosquittoSettings) -> str:
    """The listener's TLS lines; mosquitto ties them to the `listener` line before them."""
    checks_clients = settings.require_certificate or settings.use_identity_as_username
    if (settings.certfile is None) != (settings.keyfile is None):
        raise ValueError("a TLS listener needs both certfile and keyfile")
    if settings.certfile is None:
        if settings.cafile is not None or checks_clients:
            raise ValueError("cafile and client certificates need a TLS listener (certfile)")
        return ""
    if checks_clients and settings.cafile is None:
        raise ValueError("checking client certificates needs the cafile that signed them")
    text = "" if settings.cafile is None else f"cafile {settings.cafile}\n"
    text += f"certfile {settings.certfile}\nkeyfile {settings.keyfile}\n"
    if checks_clients:
        text += "require_certificate true\n"
    if settings.use_identity_as_username:
        text += "use_identity_as_username true\n"
    return text


def open_to_broker(folder: Path) -> None:
    """Let the broker write its persistence in `folder`, and no other user.

    Started as root, mosquitto drops to user `mosquitto` (to `nobody` where there is no
    such user) before it saves anything: the folder is handed to that user, 0700, or opened
    to all when only `nobody` remains. Run as another user, the broker runs as that user,
    who owns the folder already.
    """
    if os.geteuid() != 0:
        return
    owner = broker_user()
    if owner is None:
        folder.chmod(0o777)
        return
    os.chown(folder, *owner)
    folder.chmod(0o700)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


class LocalBroker:
    """A mosquitto process on loopback, for tests, benchmarks and the demo.

    The data directory (persistence, config) outlives `stop()` so a test can restart the
    broker on the same port and data and see what it persisted.
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | None = None,
        **settings: object,
    ) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise FileNotFoundError(
                "mosquitto is not installed: run `bash broker/install.sh` (Debian) first"
            )
        self.binary = binary
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="flotta-broker-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        open_to_broker(self.data_dir)
        self.settings = MosquittoSettings(
            port=port or free_port(),
            data_dir=self.data_dir,
            **settings,  # type: ignore[arg-type]
        )
        while self.settings.websockets_port in (0, self.settings.port):  # 0: any free port
            self.settings.websockets_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "mosquitto.log"

    @property
    def host(self) -> str:
        return self.settings.bind_address

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.settings.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str | None:
        """The MQTT-over-WebSockets URL browsers use, if the broker has that listener."""
        if self.settings.websockets_port is None:
            return None
        scheme = "wss" if self.settings.tls else "ws"
        host = self.settings.websockets_bind_address
        return f"{scheme}://{host}:{self.settings.websockets_port}"

    def start(self, timeout: float = 10.0) -> LocalBroker:
        config = self.data_dir / "mosquitto.conf"
        # Owner-only: a bridge block holds its password. mosquitto reads it before dropping root.
        write_private(config, render_config(self.settings))
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        try:
            wait_for_port(self.host, self.port, timeout)
            if self.settings.websockets_port is not None:
                host = self.settings.websockets_bind_address
                wait_for_port(host, self.settings.websockets_port, timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"mosquitto did not start on port {self.port}: {self.log_path.read_text()[-2000:]}"
            ) from None
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the broker; `kill=True` sends SIGKILL, as in a crash."""
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
