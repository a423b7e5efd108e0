"""Azurite, a real Azure Storage API (blob service) on loopback for the store's Azure tests.

Installed from npm into `.azurite` at the repo root by `bash broker/install.sh test`; a
missing Azurite fails the test that needs it (a requirement, as mosquitto is). Each server
gets an account of its own with a key generated at run time (AZURITE_ACCOUNTS), its data
in a temporary folder, and a free port.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flotta_mqtt.broker.local import free_port, wait_for_port

AZURITE = Path(__file__).resolve().parents[1] / ".azurite/node_modules/.bin/azurite-blob"


@dataclass(frozen=True)
class AzureAccount:
    """A storage account on a running Azurite: what adlfs needs to reach it."""

    name: str
    key: str
    endpoint: str  # the blob service, http://127.0.0.1:PORT/NAME

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.name};AccountKey={self.key};"
            f"BlobEndpoint={self.endpoint};"
        )

    @property
    def options(self) -> dict[str, str]:
        """The store's storage options for this account."""
        return {"connection_string": self.connection_string}


@contextlib.contextmanager
def azurite(folder: Path) -> Iterator[AzureAccount]:
    """A fresh Azurite blob service keeping its data in `folder`, stopped on exit."""
    if not AZURITE.exists():
        raise FileNotFoundError(
            f"Azurite is not installed at {AZURITE}: run `bash broker/install.sh test`"
        )
    account = "flotta" + os.urandom(4).hex()
    key = base64.b64encode(os.urandom(64)).decode()
    port = free_port()
    process = subprocess.Popen(
        [
            str(AZURITE),
            *("--blobHost", "127.0.0.1", "--blobPort", str(port)),
            *("--location", str(folder), "--silent", "--skipApiVersionCheck"),
        ],
        env={**os.environ, "AZURITE_ACCOUNTS": f"{account}:{key}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30.0)
        yield AzureAccount(account, key, f"http://127.0.0.1:{port}/{account}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
