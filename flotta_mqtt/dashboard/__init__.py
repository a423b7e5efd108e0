"""The web dashboard: a static page that reads the bus over MQTT WebSockets, read-only.

`static/` holds the page (no build step: plain HTML, CSS and JavaScript, with MQTT.js
vendored under `static/vendor/`); `server.py` serves it with the standard library, with the
broker's WebSockets URL and the dashboard identity in `config.json`.
"""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"

__all__ = ["STATIC"]
