"""The web dashboard, end to end: headless Chromium (Debian's, driven by Playwright) loads
the page served by `flotta-mqtt dashboard`, which connects over MQTT WebSockets to a real
mosquitto with identities and an ACL, as the read-only dashboard identity, while an
artifact runs on an in-process scheduler and workers.

The artifact is held mid-way by the `slow` test operation waiting for a flag file, so the
page is seen with some jobs completed and one running, then with all of them completed.
Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_for

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.broker.identities import Identities, IdentitySpec, generate_identities
from flotta_mqtt.broker.local import MosquittoSettings, free_port, render_config, wait_for_port
from flotta_mqtt.client.client import Client
from flotta_mqtt.dashboard import STATIC
from flotta_mqtt.dashboard.server import DashboardServer
from flotta_mqtt.model import (
    Artifact,
    ArtifactState,
    Collect,
    Distribute,
    Finalize,
    Initialize,
    Operation,
    Parallel,
)
from flotta_mqtt.nodes import SchedulerNode
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import BrokerSettings, StorageSettings
from flotta_mqtt.worker.agent import WorkerAgent, WorkerConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
PLUGIN = "tests.plugins.test_ops"
WORKERS = ("node-a", "node-b", "node-c")
TIMEOUT = 20.0
CHROMIUM = "/usr/bin/chromium"
# As the machine notes say: without the background-networking flags Chromium keeps trying
# Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# --- the page's server and the broker's WebSockets listener, without a browser ---------------


def test_the_websockets_listener_is_rendered_after_the_tcp_one(tmp_path: Path) -> None:
    text = render_config(MosquittoSettings(port=1883, data_dir=tmp_path, websockets_port=9001))
    assert "listener 1883 127.0.0.1\nlistener 9001 127.0.0.1\nprotocol websockets\n" in text
    plain = render_config(MosquittoSettings(port=1883, data_dir=tmp_path))
    assert "protocol websockets" not in plain


def test_the_shipped_websockets_example_is_the_rendered_one() -> None:
    rendered = render_config(
        MosquittoSettings(port=1883, data_dir=Path("/var/lib/mosquitto"), websockets_port=9001)
    )
    assert (REPO / "broker" / "mosquitto-websockets.conf").read_text() == rendered


def test_the_vendored_mqtt_js_is_the_recorded_one() -> None:
    notes = (STATIC / "vendor" / "README.md").read_text()
    digest = hashlib.sha256((STATIC / "vendor" / "mqtt.min.js").read_bytes()).hexdigest()
    assert digest in notes
    assert re.search(r"`mqtt` \*\*\d+\.\d+\.\d+\*\*", notes)
    assert "MIT" in (STATIC / "vendor" / "mqtt.LICENSE.md").read_text()


def test_the_server_hands_out_the_page_config_and_nothing_else() -> None:
    with DashboardServer("ws://127.0.0.1:9001", port=0, username="dash", password="pw") as server:
        with urllib.request.urlopen(server.url + "config.json", timeout=5) as reply:
            config = json.loads(reply.read())
            assert reply.headers["Cache-Control"] == "no-store"
        assert config == {
            "broker": "ws://127.0.0.1:9001",
            "root": "flotta/v1",
            "username": "dash",
            "password": "pw",
        }
        with urllib.request.urlopen(server.url, timeout=5) as reply:
            assert "flotta_mqtt dashboard" in reply.read().decode()
            assert "script-src 'self'" in reply.headers["Content-Security-Policy"]
        with urllib.request.urlopen(server.url + "vendor/mqtt.min.js", timeout=5) as reply:
            assert reply.read() == (STATIC / "vendor" / "mqtt.min.js").read_bytes()
        for path in ("vendor/", "../server.py", "nothing.html"):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(server.url + path, timeout=5)
            assert error.value.code == 404, path
    with pytest.raises(ValueError, match="ws:// or wss://"):
        DashboardServer("http://127.0.0.1:9001", port=0)


# --- end to end in Chromium --------------------------------------------------------------------


@dataclass
class Deployment:
    broker: LocalBroker
    identities: Identities
    client: Client
    storage: StorageSettings


SPEC = IdentitySpec(
    scheduler="scheduler", workers=list(WORKERS), workbenches=["alice"], dashboards=["dash"]
)


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    """As deployed: identities and ACL, a WebSockets listener, every node its own identity."""
    data_dir = Path(tempfile.mkdtemp(prefix="flotta-dashboard-"))
    nodes: list[SchedulerNode | WorkerAgent] = []
    try:
        identities = generate_identities(SPEC, data_dir / "identities")
        with LocalBroker(
            data_dir=data_dir,  # opened to user mosquitto, who must reach the identities
            password_file=identities.password_file,
            acl_file=identities.acl_file,
            websockets_port=0,
        ) as broker:

            def settings(node: str) -> BrokerSettings:
                credential = identities.credentials[node]
                return BrokerSettings(
                    url=broker.url, username=credential.username, password=credential.password
                )

            storage = StorageSettings(url=(data_dir / "store").as_uri())
            config = SchedulerConfig(
                broker=settings("scheduler"),
                initiator_broker=settings("scheduler.initiator"),
                storage=storage,
                database=data_dir / "scheduler.db",
                initiator_plugins=[PLUGIN],
            )
            nodes.append(SchedulerNode(config).start(wait=TIMEOUT))
            for name in WORKERS:
                csv = data_dir / f"{name}.csv"
                csv.write_text("x\n0.25\n0.75\n")
                worker = WorkerConfig(
                    name=name,
                    broker=settings(name),
                    storage=storage,
                    datasets={"demo": {"paths": [csv], "privacy": {"exact": True}}},
                    plugins=[PLUGIN],
                    state_dir=data_dir / f"{name}.state",
                )
                nodes.append(WorkerAgent(worker).start(wait=TIMEOUT))
            with Client(settings("alice"), storage=storage) as client:
                names = {*WORKERS, config.initiator}
                wait_for(
                    lambda: names <= {p.node for p in client.workers() if p.online},
                    timeout=TIMEOUT,
                    message="the nodes never came online",
                )
                yield Deployment(broker, identities, client, storage)
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def dashboard(deployment: Deployment) -> Iterator[str]:
    """`flotta-mqtt dashboard` as a user starts it, with the dashboard identity; its URL."""
    port = free_port()
    assert deployment.broker.ws_url is not None
    credential = deployment.identities.credentials["dash"]
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "flotta_mqtt.cli", "dashboard", "--port", str(port)),
            *("--broker-ws", deployment.broker.ws_url, "--username", credential.username),
        ],
        cwd=REPO,
        env={**os.environ, "FLOTTA_DASHBOARD_PASSWORD": credential.password},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=TIMEOUT)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
        assert process.returncode == 0, output.decode(errors="replace")


def test_the_dashboard_shows_the_dag_turning_completed(
    deployment: Deployment, dashboard: str, tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash broker/install.sh test` (Debian chromium)")
    from playwright.sync_api import expect, sync_playwright

    flag = tmp_path / "go"
    slow = Operation(name="slow", params={"flag": str(flag)})
    quick = Operation(name="slow")
    artifact = Artifact(
        id="dashboard-demo",
        project="demo",
        steps=[
            Initialize(quick, Distribute()),
            Parallel(quick, Collect()),
            Finalize(slow),  # held until the flag exists
        ],
    )
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(dashboard)
            expect(page.locator("#conn")).to_have_attribute("data-state", "connected")
            for name in WORKERS:
                row = page.locator(f'#workers tr[data-node="{name}"]')
                expect(row).to_have_attribute("data-online", "true")

            handle = deployment.client.submit(artifact)
            jobs = page.locator("#dag g.job")
            expect(jobs).to_have_count(5, timeout=TIMEOUT * 1000)
            expect(page.locator("#dag path.lock")).to_have_count(3 + 3)
            # Mid-way: setup and the three workers' jobs done, the final job running.
            completed = page.locator('#dag g.job[data-state="completed"]')
            expect(completed).to_have_count(4, timeout=TIMEOUT * 1000)
            running = page.locator('#dag g.job[data-state="running"]')
            expect(running).to_have_count(1)
            expect(page.locator("#artifact-state")).to_have_text("running")
            running.click()
            expect(page.locator('#job-fields dd[data-field="state"]')).to_have_text("running")
            expect(page.locator('#job-fields dd[data-field="waits for"]')).to_have_text(
                "jobs 1, 2, 3"
            )
            page.screenshot(path=str(ARTIFACTS / "dashboard-running.png"), full_page=True)

            flag.touch()
            assert handle.wait(timeout=TIMEOUT).state is ArtifactState.COMPLETED
            expect(completed).to_have_count(5, timeout=TIMEOUT * 1000)
            expect(page.locator("#artifact-state")).to_have_text("completed")
            expect(page.locator('#job-fields dd[data-field="state"]')).to_have_text("completed")
            expect(page.locator(f'#artifacts li[data-artifact="{artifact.id}"]')).to_have_attribute(
                "data-state", "completed"
            )
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert errors == [], errors
        finally:
            browser.close()
