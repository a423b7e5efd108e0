"""Fixtures of the fault tests: namespaces, a broker reachable from them, node processes.

- `netns`: a network namespace joined to the host by a veth pair (see netns.py); removed
  with its veth pair and nft table after the test, whatever happened.
- `ns_broker`: a mosquitto listening on loopback and on the host end of `netns`'s veth
  pair (a second `listener` line, same port), so a node in the namespace reaches it.
- `ns_cluster` / `cluster`: node processes (cluster.py) on `ns_broker` / on the loopback
  `broker` of tests/conftest.py, stopped after the test.

Teardown runs in reverse order of setup, and each fixture depends on what must outlive
it: the processes stop first, then the broker, then the namespace goes.

These tests need root (namespaces, veth, nftables), `ip` and `nft`. Without them they
fail, as the suite fails without mosquitto; deselect them with `-m "not faults"`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster
from netns import Netns

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.local import free_port


@pytest.fixture(autouse=True)
def _fault_tools() -> None:
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        pytest.fail(
            "fault tests need root and iproute2 + nftables "
            f"(euid {os.geteuid()}, missing: {missing or 'nothing'}); "
            "deselect them with -m 'not faults'"
        )


@pytest.fixture
def netns() -> Iterator[Netns]:
    with Netns() as namespace:
        yield namespace


@pytest.fixture
def ns_broker(netns: Netns) -> Iterator[LocalBroker]:
    """A broker on loopback and on the host end of `netns`'s veth pair, same port."""
    port = free_port()
    local = LocalBroker(port=port, extra=[f"listener {port} {netns.host_address}"])
    with local:
        yield local


@pytest.fixture
def ns_cluster(ns_broker: LocalBroker, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(ns_broker.url, tmp_path, ns_broker.log_path)
    try:
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
def cluster(broker: LocalBroker, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(broker.url, tmp_path, broker.log_path)
    try:
        yield nodes
    finally:
        nodes.close()
