"""Node commands on a damaged store: `flotta-mqtt scheduler` and `worker` refuse to start
with one line naming the file and how to recover, and exit code 2 (invalid input: a
file), before connecting to any broker and without writing to the file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from flotta_mqtt.broker.local import free_port
from flotta_mqtt.cli.errors import INVALID
from flotta_mqtt.worker.journal import Journal

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> tuple[int, str]:
    """`python -m flotta_mqtt.cli ARGS` to its end, on a broker nobody listens on."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FLOTTA_")}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    process = subprocess.run(
        [sys.executable, "-m", "flotta_mqtt.cli", *args],
        cwd=REPO,
        env={**environment, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.stdout == "", process.stdout
    return process.returncode, process.stderr


def damage(path: Path) -> None:
    """A SQLite file whose header disagrees with its pages: quick_check reports it."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE jobs (a INTEGER)")
        db.commit()
    with path.open("r+b") as f:
        f.seek(52)
        f.write((7).to_bytes(4, "big"))


def scheduler(database: Path) -> tuple[int, str]:
    broker = f"mqtt://127.0.0.1:{free_port()}"
    return run("scheduler", "--database", str(database), "--broker", broker)


@pytest.mark.parametrize("spoil", ["not-sqlite", "damaged", "a-journal"])
def test_a_scheduler_on_a_damaged_or_foreign_database_refuses_to_start(
    tmp_path: Path, spoil: str
) -> None:
    database = tmp_path / "scheduler.db"
    if spoil == "not-sqlite":
        database.write_text("artifact,state\nart1,running\n" * 50)
    elif spoil == "damaged":
        damage(database)
    else:  # a worker's journal given as the database
        Journal(tmp_path / "w0").close()
        database = tmp_path / "w0" / "journal.db"
    before = database.read_bytes()
    code, err = scheduler(database)
    assert code == INVALID, err
    assert err.count("\n") == 1 and err.startswith(f"error: the scheduler database {database}")
    if spoil == "a-journal":
        assert "is not ours (it holds tables privacy_spent, task_cache)" in err
    else:
        assert "is damaged" in err and "move it aside" in err and "retained on the broker" in err
    assert database.read_bytes() == before


def test_a_worker_on_a_damaged_journal_refuses_to_start(tmp_path: Path) -> None:
    state = tmp_path / "w0.state"
    state.mkdir()
    damage(state / "journal.db")
    config = tmp_path / "w0.yaml"
    config.write_text(f"state_dir: {state}\n")
    broker = f"mqtt://127.0.0.1:{free_port()}"
    code, err = run("worker", "--name", "w0", "--config", str(config), "--broker", broker)
    assert code == INVALID, err
    assert err.count("\n") == 1
    assert err.startswith(f"error: the worker journal {state / 'journal.db'} is damaged")
    assert "move it aside and start the worker again" in err
