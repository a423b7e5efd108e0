"""Cached workflow tasks through the CLI, on a real mosquitto: a task with `cache: true`
whose definition and inputs match an earlier successful run reuses its outputs (the status
shows it cached); a file swapped in the store under the cached path is caught by its
sha256 and the task runs; a tenant never reuses another tenant's run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_workflows import (  # noqa: F401  (flotta: the fixture)
    TIMEOUT,
    Flotta,
    by_name,
    flotta,
    invoke,
    run_and_wait,
    submitted_id,
    write_workflow,
)

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.identities import Identities, IdentitySpec, generate_identities
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import ArtifactState, JobState, Registry
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.protocol import ArtifactStatus
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import StorageSettings
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig
from flotta_mqtt.workflows.caching import CACHED_PRODUCT

pytestmark = pytest.mark.integration

# `draw` writes 32 random bytes: a run tells itself apart from any other by its output.
CACHED = {
    "name": "cached",
    "tasks": [
        {
            "name": "draw",
            "cache": True,
            "params": {"shell": "head -c 32 /dev/urandom | od -An -tx1 > drawn.txt"},
            "outputs": ["drawn.txt"],
        },
        {
            "name": "show",
            "depends": ["draw"],
            "params": {"shell": "cat drawn.txt"},
            "inputs": ["drawn.txt"],
        },
    ],
}


def drawn(store: ResourceStore, status: ArtifactStatus) -> bytes:
    """What `draw` output in this artifact (its own copy, in its own folder)."""
    job = by_name(status)["draw"]
    return store.get_bytes(store.job_file_url(status.artifact_id, str(job.id), 1, "drawn.txt"))


def was_cached(status: ArtifactStatus) -> bool:
    job = by_name(status)["draw"]
    assert job.state is JobState.COMPLETED and job.product is not None
    return job.product.media_type == CACHED_PRODUCT


def test_a_cached_task_reuses_its_outputs_until_they_are_tampered_with(flotta: Flotta) -> None:  # noqa: F811
    flotta.start({"w0": ["shell"]})
    store = ResourceStore(flotta.storage.url)
    first = run_and_wait(flotta, CACHED)
    assert first.state is ArtifactState.COMPLETED, first.error
    assert not was_cached(first)

    second = run_and_wait(flotta, CACHED)
    assert second.state is ArtifactState.COMPLETED, second.error
    assert was_cached(second)
    assert drawn(store, second) == drawn(store, first)
    # `show` read the copy in its own artifact's folder, and ran.
    show = by_name(second)["show"]
    assert show.product is not None and show.product.media_type == "application/json"
    said = store.get_bytes(store.log_url(second.artifact_id, "show", 1, "stdout"))
    assert said == drawn(store, first)
    product = json.loads(store.get(by_name(second)["draw"].product))  # type: ignore[arg-type]
    assert product["cached"] == {
        "artifact_id": first.artifact_id,
        "job_id": by_name(first)["draw"].id,
        "attempt": 1,
    }
    assert product["logs"] == {} and product["exit_code"] == 0
    listed = flotta.cli("status", second.artifact_id)
    assert listed.exit_code == 0, listed.output
    rows = {line.split("│")[1].strip(): line for line in listed.output.splitlines() if "│" in line}
    assert "completed (cached)" in rows["draw"] and "cached" not in rows["show"]

    # The entry now names the second artifact's copy: swap its bytes (same size) there.
    job = by_name(second)["draw"]
    copy = flotta.folder / "store/artifacts" / second.artifact_id / f"files/{job.id}~1/drawn.txt"
    forged = b"f" * len(copy.read_bytes())
    copy.write_bytes(forged)
    third = run_and_wait(flotta, CACHED)
    assert third.state is ArtifactState.COMPLETED, third.error
    assert not was_cached(third), "a swapped file is never reused"
    assert drawn(store, third) not in (forged, drawn(store, first))
    # The run that replaced the spoiled entry is reused in its turn.
    fourth = run_and_wait(flotta, CACHED)
    assert was_cached(fourth) and drawn(store, fourth) == drawn(store, third)


def test_a_task_without_cache_or_with_other_inputs_runs_again(flotta: Flotta) -> None:  # noqa: F811
    flotta.start({"w0": ["shell"]})
    plain = json.loads(json.dumps(CACHED))
    del plain["tasks"][0]["cache"]
    for _ in range(2):
        assert not was_cached(run_and_wait(flotta, plain))
    # Same task, another input (by its sha256): no reuse.
    chained: dict[str, Any] = {
        "tasks": [
            {"name": "seed", "params": {"shell": "date +%s%N > seed"}, "outputs": ["seed"]},
            {
                "name": "draw",
                "depends": ["seed"],
                "cache": True,
                "params": {"shell": "cat seed > drawn.txt"},
                "inputs": ["seed"],
                "outputs": ["drawn.txt"],
            },
        ]
    }
    runs = [run_and_wait(flotta, chained) for _ in range(2)]
    assert [was_cached(status) for status in runs] == [False, False]


# --- tenants ---------------------------------------------------------------------------------

REGISTRY = Registry.model_validate(
    {
        "workers": {"site": {"executors": ["shell"]}},
        "workbenches": {
            "alice": {"tenant": "oncology"},
            "carol": {"tenant": "oncology"},
            "bob": {"tenant": "cardiology"},
        },
    }
)


@pytest.fixture
def tenants() -> Iterator[tuple[str, Identities, StorageSettings]]:
    """A scheduler with the registry above and its generated ACL, and one shell worker
    with a journal on disk; yields the broker's URL, the identities and the store.

    In a folder of its own outside pytest's (which the broker's user cannot enter)."""
    tmp_path = Path(tempfile.mkdtemp(prefix="flotta-cache-"))
    try:
        yield from _tenants(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _tenants(tmp_path: Path) -> Iterator[tuple[str, Identities, StorageSettings]]:
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text(REGISTRY.model_dump_json())
    identities = generate_identities(IdentitySpec.of(REGISTRY), tmp_path / "identities")
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    with LocalBroker(
        data_dir=tmp_path, password_file=identities.password_file, acl_file=identities.acl_file
    ) as broker:
        scheduler = SchedulerNode(
            SchedulerConfig(
                broker=identities.broker_settings("scheduler", broker.url),
                initiator_broker=identities.broker_settings("scheduler.initiator", broker.url),
                storage=storage,
                database=tmp_path / "scheduler.db",
                registry=registry_file,
            )
        ).start(wait=TIMEOUT)
        worker = WorkerAgent(
            WorkerConfig(
                name="site",
                broker=identities.broker_settings("site", broker.url),
                storage=storage,
                executors=["shell"],
                state_dir=tmp_path / "site",
            )
        ).start(wait=TIMEOUT)
        try:
            yield broker.url, identities, storage
        finally:
            worker.stop()
            scheduler.stop()


def test_a_tenant_reuses_its_own_cached_runs_never_another_tenants(
    tenants: tuple[str, Identities, StorageSettings], tmp_path: Path
) -> None:
    url, identities, storage = tenants
    path = write_workflow(tmp_path, CACHED)
    store = ResourceStore(storage.url)

    def submit_as(name: str) -> ArtifactStatus:
        settings = identities.broker_settings(name, url)
        assert settings.username and settings.password
        login = ["--broker", url, "--username", settings.username]
        result = invoke("submit", str(path), *login, "--password", settings.password)
        artifact_id = submitted_id(result)
        with Client(settings, storage=storage) as client:
            return client.handle(artifact_id).wait(timeout=TIMEOUT)

    alice = submit_as("alice")
    assert alice.state is ArtifactState.COMPLETED and not was_cached(alice)
    carol = submit_as("carol")  # alice's tenant
    assert was_cached(carol) and drawn(store, carol) == drawn(store, alice)
    bob = submit_as("bob")  # another tenant: the same task on the same inputs runs
    assert not was_cached(bob) and drawn(store, bob) != drawn(store, alice)
    again = submit_as("bob")
    assert was_cached(again) and drawn(store, again) == drawn(store, bob)
