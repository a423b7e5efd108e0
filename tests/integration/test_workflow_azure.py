"""Workflows with their job files on Azure Blob Storage (Azurite on loopback), through the
CLI on a real mosquitto: the diamond, and a cached task reused, then caught out by a blob
swapped under the cached path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from azurite import AzureAccount, azurite
from helpers import wait_for
from test_workflow_cache import CACHED, drawn, was_cached
from test_workflows import DIAMOND, Flotta, by_name, check_diamond, run_and_wait

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.transport.settings import StorageSettings
from flotta_mqtt.transport.store import ResourceStore

pytestmark = pytest.mark.integration


@pytest.fixture
def account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AzureAccount]:
    """An Azurite account; the CLI finds its credentials in the environment, as adlfs reads
    them (AZURE_STORAGE_CONNECTION_STRING)."""
    try:
        server = azurite(tmp_path / "azurite")
        account = server.__enter__()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", account.connection_string)
    yield account
    server.__exit__(None, None, None)


def test_workflows_and_their_cache_run_on_azure(
    broker: LocalBroker, tmp_path: Path, account: AzureAccount
) -> None:
    raw = fsspec.filesystem("az", connection_string=account.connection_string)
    raw.mkdir("flotta")
    storage = StorageSettings(url="az://flotta/wf", options=account.options)
    flotta = Flotta(broker.url, tmp_path, storage)
    try:
        flotta.start({"w0": ["shell"]})  # one worker: its cache serves every run
        check_diamond(run_and_wait(flotta, DIAMOND))
        store = ResourceStore(storage.url, storage.options)
        first = run_and_wait(flotta, CACHED)
        second = run_and_wait(flotta, CACHED)
        assert not was_cached(first) and was_cached(second)
        assert drawn(store, second) == drawn(store, first)
        job = by_name(second)["draw"]
        copy = store.job_file_url(second.artifact_id, str(job.id), 1, "drawn.txt")
        raw.pipe_file(copy.removeprefix("abfs://"), b"f" * len(drawn(store, second)))
        wait_for(lambda: store.get_bytes(copy).startswith(b"f"), message="the swap is seen")
        third = run_and_wait(flotta, CACHED)
        assert not was_cached(third) and drawn(store, third) != drawn(store, first)
    finally:
        flotta.close()
    assert not (tmp_path / "store").exists(), "nothing went to local storage"
