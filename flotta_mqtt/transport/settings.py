"""Node settings shared by every role: the broker and the resource store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from flotta_mqtt.transport.bus import DAY, BrokerConfig


class BrokerSettings(BaseModel):
    """Where the broker is and who this node is there (see broker/ for identities)."""

    model_config = ConfigDict(extra="forbid")

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = Field(default=15, ge=2)
    session_expiry: int = Field(default=DAY, ge=0)
    reconnect_delay_max: int = Field(default=4, ge=1)  # seconds between reconnect attempts

    def bus_config(self) -> BrokerConfig:
        return BrokerConfig(
            url=self.url,
            username=self.username,
            password=self.password,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            keepalive=self.keepalive,
            session_expiry=self.session_expiry,
            reconnect_delay=(1, self.reconnect_delay_max),
        )


class StorageSettings(BaseModel):
    """The shared resource store: file:// (default) or s3:// with its options."""

    model_config = ConfigDict(extra="forbid")

    url: str = "file://./flotta-store"
    options: dict[str, Any] = Field(default_factory=dict)


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
