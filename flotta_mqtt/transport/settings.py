"""Node settings shared by every role and the CLI: the broker and the resource store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flotta_mqtt.model import Registry
from flotta_mqtt.model.errors import describe
from flotta_mqtt.protocol.topics import check_group

DAY = 24 * 3600
SCHEMES = ("mqtt", "mqtts", "memory")  # memory://NAME: the in-memory broker of this process
ACCEPTED = "mqtt://host:port, mqtts://host:port or memory://name"
# The most bytes one read of the store may hold: a Resource declaring more is refused
# before anything is opened (StorageSettings.max_read_bytes).
MAX_READ_BYTES = 256 * 1024 * 1024


def _url_problem(url: str) -> str | None:
    """What makes `url` no broker URL, or None when it is one."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not url.startswith(f"{parts.scheme}://"):
        return "has no known scheme"
    if not parts.hostname:
        return "names no host"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "has more than a host and a port"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "has a port that is not a number from 1 to 65535"
    if port is not None and parts.scheme == "memory":
        return "has a port, which memory://name takes none of"
    return None


class BrokerSettings(BaseModel):
    """Where the broker is, who this node is there, and how its session behaves.

    The one model for broker connection options: every role, the CLI and the tests build
    it, and both transports take it. Credentials in the URL (`mqtt://user:pass@host`) move
    to `username`/`password`, so the URL that appears in logs and errors carries none.
    """

    model_config = ConfigDict(extra="forbid")

    url: str = "mqtt://127.0.0.1:1883"  # mqtt://host:port, or mqtts:// for TLS
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # TLS: the CA that signed the broker's certificate
    cert_file: str | None = None  # TLS: this node's client certificate, if the broker asks
    key_file: str | None = None
    keepalive: int = Field(default=15, ge=2)
    session_expiry: int = Field(default=DAY, ge=0)  # how long the broker queues while away
    # Retries at 1, 2, 4, 4… s: an edge node is back within seconds of its link.
    reconnect_delay_min: int = Field(default=1, ge=1)
    reconnect_delay_max: int = Field(default=4, ge=1)
    inflight: int = Field(default=100, ge=1)  # paho's cost per PUBACK grows with it
    window: int = Field(default=10_000, ge=1, lt=65_535)  # paho's message ids wrap at 65,535
    # The scheduler group whose topics this connection uses (`flotta/v1-{group}/…`), as a
    # virtual host: None is the default group (`flotta/v1/…`). See protocol/topics.py.
    group: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _credentials_from_url(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            return data
        parts = urlsplit(data["url"])
        if parts.username is None:
            return data
        if data.get("username") is not None or data.get("password") is not None:
            raise ValueError("broker credentials given both in the URL and apart")
        host = parts.netloc.rpartition("@")[2]
        return {
            **data,
            "url": parts._replace(netloc=host).geturl(),
            "username": unquote(parts.username),
            "password": unquote(parts.password) if parts.password is not None else None,
        }

    @field_validator("url")
    @classmethod
    def _known_form(cls, url: str) -> str:
        """Refuse what is not one of ACCEPTED: a URL never falls back to a default host."""
        problem = _url_problem(url)
        if problem is not None:
            raise ValueError(f"broker URL {url!r} {problem}; expected {ACCEPTED}")
        return url

    @field_validator("group")
    @classmethod
    def _group_name(cls, group: str | None) -> str | None:
        return None if group is None else check_group(group)

    @model_validator(mode="after")
    def _ordered_delays(self) -> Self:
        if self.reconnect_delay_min > self.reconnect_delay_max:
            raise ValueError("reconnect_delay_min is over reconnect_delay_max")
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts" or self.ca_file is not None


class StorageSettings(BaseModel):
    """The shared resource store: file:// (default) or s3:// with its options.

    A node opens only URLs under `url`, and reads at most `max_read_bytes` of one resource
    (products, job files, workspaces, call arguments and outcomes).
    """

    model_config = ConfigDict(extra="forbid")

    url: str = "file://./flotta-store"
    options: dict[str, Any] = Field(default_factory=dict)
    max_read_bytes: int = Field(default=MAX_READ_BYTES, ge=1)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict, with a clear error when it is not one."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def load_registry(path: Path) -> Registry:
    """Read the operator's node registry, with a clear error naming what is wrong in it."""
    try:
        return Registry.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise ValueError(f"registry {path} is invalid: {describe(exc, 'registry')}") from None
