"""Statuses and presences whose timestamps no datetime can hold (a node's clock gone
wrong), retained on a real mosquitto: the CLI's status, watch and workers show them."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner, Result

from flotta_mqtt.broker import LocalBroker
from flotta_mqtt.cli.main import app
from flotta_mqtt.client.client import Client
from flotta_mqtt.model import ArtifactState, JobState
from flotta_mqtt.protocol import ArtifactStatus, JobSummary, NodePresence, encode, topics

pytestmark = pytest.mark.integration

TIMEOUT = 20.0
FAR = 1e12  # year 33658: finite, so the protocol takes it, but beyond datetime


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"}, catch_exceptions=False)


def test_far_future_timestamps_are_shown(broker: LocalBroker) -> None:
    job = JobSummary(
        id=0,
        step="0",
        worker="w0",
        state=JobState.COMPLETED,
        attempt=1,
        started_at=FAR,
        finished_at=FAR + 1,
    )
    status = ArtifactStatus(
        artifact_id="odd-clock",
        project="demo",
        state=ArtifactState.COMPLETED,
        seq=1,
        total=1,
        counts={JobState.COMPLETED: 1},
        jobs=[job],
        locks=[],
        updated_at=FAR,
    )
    presence = NodePresence(node="w0", online=True, projects=["demo"], since=FAR)
    with Client(broker.url) as client:
        client.bus.publish_raw(topics.status("someone", "odd-clock"), encode(status), retain=True)
        client.bus.publish_raw(topics.presence("w0"), encode(presence), retain=True)
        assert client.handle("odd-clock").next_status(timeout=TIMEOUT) is not None
        assert [p.node for p in client.workers()] == ["w0"]

    result = invoke("status", "odd-clock", "--broker", broker.url)
    assert result.exit_code == 0, result.output
    assert "completed" in result.output and "1e+12 (not a valid time)" in result.output

    result = invoke("watch", "odd-clock", "--broker", broker.url)
    assert result.exit_code == 0, result.output
    assert "1e+12 (not a valid time) completed 1/1" in result.output

    result = invoke("workers", "--broker", broker.url)
    assert result.exit_code == 0, result.output
    assert "since 1e+12 (not a valid time) (in the future)" in result.output
