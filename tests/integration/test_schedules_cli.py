"""Scheduled runs through `flotta-mqtt schedule`, on a real mosquitto with the ACL generated
from a registry: a run per minute the cron names, made up once each for the minutes the
scheduler was down, never twice across restarts; only the owner (or an admin) lists or
removes a schedule.

Time is the scheduler's wall clock seam (`Scheduler.wall`), moved by the test: no sleeps.
Each run appends its minute to a ledger file, so a run that happened twice would show.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from test_workflows import TIMEOUT, invoke
from typer.testing import Result

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.identities import Identities, IdentitySpec, generate_identities
from flotta_mqtt.cli.errors import INVALID
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import ArtifactState, Registry
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

REGISTRY = Registry.model_validate(
    {
        "workers": {"site": {"executors": ["shell"]}},
        "workbenches": {
            "alice": {"tenant": "oncology"},
            "bob": {"tenant": "cardiology"},
            "ops": {"admin": True},
        },
    }
)
NOON = datetime(2026, 12, 3, 12, 0, 30, tzinfo=UTC).timestamp()  # 30 s past 12:00


@dataclass
class Wall:
    """The scheduler's wall clock, at the test's word."""

    at: float

    def __call__(self) -> float:
        return self.at


@dataclass
class Site:
    folder: Path
    broker: LocalBroker
    identities: Identities
    storage: StorageSettings
    wall: Wall = field(default_factory=lambda: Wall(NOON))
    scheduler: SchedulerNode | None = None

    def start_scheduler(self) -> None:
        """A scheduler on the site's database, its wall clock the test's."""
        node = SchedulerNode(
            SchedulerConfig(
                broker=self.identities.broker_settings("scheduler", self.broker.url),
                initiator_broker=self.identities.broker_settings(
                    "scheduler.initiator", self.broker.url
                ),
                storage=self.storage,
                database=self.folder / "scheduler.db",
                registry=self.folder / "registry.yaml",
            )
        )
        node.scheduler.wall = self.wall
        self.scheduler = node.start(wait=TIMEOUT)

    def stop_scheduler(self) -> None:
        assert self.scheduler is not None
        self.scheduler.stop()
        self.scheduler = None

    def cli(self, who: str, *args: str) -> Result:
        settings = self.identities.broker_settings(who, self.broker.url)
        assert settings.username and settings.password
        login = ("--broker", self.broker.url, "--username", settings.username)
        return invoke("schedule", *args, *login, "--password", settings.password)

    def wait_done(self, artifact_ids: list[str]) -> None:
        """Wait for each artifact to complete, watched as its owner, alice."""
        settings = self.identities.broker_settings("alice", self.broker.url)
        with Client(settings, storage=self.storage) as client:
            for artifact_id in artifact_ids:
                status = client.handle(artifact_id).wait(timeout=TIMEOUT)
                assert status.state is ArtifactState.COMPLETED, status.error

    def artifacts(self) -> list[str]:
        with closing(sqlite3.connect(self.folder / "scheduler.db")) as db:
            return sorted(row[0] for row in db.execute("SELECT id FROM artifacts"))


@pytest.fixture
def site() -> Iterator[Site]:
    """Broker, identities and a shell worker, in a folder the broker's user may enter."""
    folder = Path(tempfile.mkdtemp(prefix="flotta-schedules-"))
    (folder / "registry.yaml").write_text(REGISTRY.model_dump_json())
    identities = generate_identities(IdentitySpec.of(REGISTRY), folder / "identities")
    storage = StorageSettings(url=(folder / "store").as_uri())
    try:
        with LocalBroker(
            data_dir=folder,
            password_file=identities.password_file,
            acl_file=identities.acl_file,
        ) as broker:
            site = Site(folder, broker, identities, storage)
            site.start_scheduler()
            worker = WorkerAgent(
                WorkerConfig(
                    name="site",
                    broker=identities.broker_settings("site", broker.url),
                    storage=storage,
                    executors=["shell"],
                )
            ).start(wait=TIMEOUT)
            try:
                yield site
            finally:
                worker.stop()
                if site.scheduler is not None:
                    site.stop_scheduler()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def minute(hour: int, minute: int) -> float:
    return datetime(2026, 12, 3, hour, minute, tzinfo=UTC).timestamp()


def test_runs_fire_each_minute_once_across_restarts_and_only_the_owner_manages_them(
    site: Site,
) -> None:
    ledger = site.folder / "ledger"
    workflow = {
        "name": "every-minute",
        "tasks": [{"name": "note", "params": {"shell": f"echo ran >> {ledger}"}}],
    }
    path = site.folder / "workflow.yaml"
    path.write_text(yaml.safe_dump(workflow))

    added = site.cli("alice", "add", str(path), "--cron", "* * * * *", "--id", "nightly")
    assert added.exit_code == 0, added.output
    assert added.output.strip() == (
        "schedule nightly: * * * * * (UTC), next run at 2026-12-03 12:01 UTC"
    )
    taken = site.cli("bob", "add", str(path), "--cron", "0 * * * *", "--id", "nightly")
    assert taken.exit_code == INVALID and "schedule ID nightly is taken" in taken.output
    bad = site.cli("alice", "add", str(path), "--cron", "61 * * * *")
    assert bad.exit_code == INVALID
    assert "cron minute field '61': 61 is out of range 0-59" in bad.output

    # Another tenant neither sees nor removes it; an admin sees it.
    assert "schedules (0)" in site.cli("bob", "list").output
    refused = site.cli("bob", "remove", "nightly")
    assert refused.exit_code == INVALID and "no such schedule ID nightly" in refused.output
    listed = site.cli("ops", "list", "--output", "json").output
    assert '"schedule_id": "nightly"' in listed and '"owner": "alice"' in listed

    site.wall.at = minute(12, 1) + 30
    site.wait_done(["nightly-202612031201"])

    # Down from 12:01:30 to 12:04:30: the three runs missed fire once each when it is back.
    site.stop_scheduler()
    site.wall.at = minute(12, 4) + 30
    site.start_scheduler()
    caught_up = [f"nightly-2026120312{m:02d}" for m in (2, 3, 4)]
    site.wait_done(caught_up)
    # Restarted again at the same moment, then on to 12:05: only 12:05's run is new.
    site.stop_scheduler()
    site.start_scheduler()
    site.wall.at = minute(12, 5) + 1
    site.wait_done(["nightly-202612031205"])
    runs = [f"nightly-2026120312{m:02d}" for m in range(1, 6)]
    assert site.artifacts() == runs
    assert ledger.read_text().splitlines() == ["ran"] * 5, "each run ran once"
    assert '"runs": 5' in site.cli("alice", "list", "--output", "json").output
    with closing(sqlite3.connect(site.folder / "scheduler.db")) as db:
        stored = db.execute("SELECT next_run, runs FROM schedules").fetchall()
    assert stored == [(minute(12, 6), 5)], "the next run is written with each run"

    removed = site.cli("alice", "remove", "nightly")
    assert removed.exit_code == 0 and "removed schedule nightly" in removed.output
    assert "schedules (0)" in site.cli("ops", "list").output
