"""Serve the dashboard's static page with the standard library's HTTP server.

The page itself talks to the broker (MQTT over WebSockets) from the browser; this server
only hands out the files and `config.json`: where the broker's WebSockets listener is, the
topic root, and the dashboard identity's username and password when given. That identity
may only read statuses, lock releases and presence (broker/README.md), so handing it to
whoever can load the page gives away nothing it could not already see there; still, the
server listens on loopback unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from typing import Any

from flotta_mqtt.dashboard import STATIC
from flotta_mqtt.protocol import topics

log = logging.getLogger(__name__)

# The page loads only its own files; it connects to the broker named in config.json.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; worker-src 'self' blob:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


class DashboardServer:
    """The dashboard's files on http://host:port/, in a daemon thread."""

    def __init__(
        self,
        broker_ws: str,
        port: int = 8080,
        host: str = "127.0.0.1",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not broker_ws.startswith(("ws://", "wss://")):
            raise ValueError(f"--broker-ws must be a ws:// or wss:// URL, not {broker_ws}")
        self.config: dict[str, Any] = {
            "broker": broker_ws,
            "root": topics.ROOT,
            "username": username,
            "password": password,
        }
        config_body = json.dumps(self.config).encode()

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(STATIC), **kwargs)

            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/config.json":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(config_body)))
                    self.send_header("Cache-Control", "no-store")
                    self.end_headers()
                    self.wfile.write(config_body)
                    return
                super().do_GET()

            def list_directory(self, path: str | os.PathLike[str]) -> BytesIO | None:
                self.send_error(404, "not found")
                return None

            def end_headers(self) -> None:
                self.send_header("Content-Security-Policy", CSP)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Referrer-Policy", "no-referrer")
                super().end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("dashboard: " + format, *args)

        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="dashboard-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{shown!s}:{port}/"

    def start(self) -> DashboardServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
