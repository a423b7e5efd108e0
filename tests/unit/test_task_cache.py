"""The task cache's parts: its key, what it adds to messages, its index in the journal, and
the runner reusing, refusing and recording runs (on a local store, no bus)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from helpers import task_job
from hypothesis import given
from hypothesis import strategies as st

from flotta_mqtt.model import Task
from flotta_mqtt.protocol import encode
from flotta_mqtt.transport.store import ResourceStore
from flotta_mqtt.worker import journal as journal_module
from flotta_mqtt.worker.journal import Journal
from flotta_mqtt.workflows.caching import cache_key
from flotta_mqtt.workflows.executors import TaskRunner

DRAW = Task(
    name="draw",
    cache=True,
    params={"shell": "head -c 16 /dev/urandom | od -An -tx1 > out"},
    outputs=["out"],
)
SHA = st.text("0123456789abcdef", min_size=64, max_size=64)


def test_a_task_without_cache_and_its_job_stay_the_size_they_were() -> None:
    plain = Task(name="t", params={"shell": "true"})
    assert "cache" not in plain.model_dump(mode="json")
    assert DRAW.model_dump(mode="json")["cache"] is True
    assert b"cache_scope" not in encode(task_job(plain))
    scoped = task_job(DRAW).model_copy(update={"cache_scope": "oncology"})
    assert b'"cache_scope":"oncology"' in encode(scoped)


@given(st.dictionaries(st.sampled_from(["a", "b/c", "d"]), SHA, max_size=3), SHA)
def test_the_key_changes_with_scope_definition_and_each_input(
    inputs: dict[str, str], other: str
) -> None:
    key = cache_key("t1", DRAW, inputs)
    assert key == cache_key("t1", DRAW, dict(reversed(list(inputs.items()))))
    assert key != cache_key("t2", DRAW, inputs)
    assert key != cache_key("t1", DRAW.model_copy(update={"env": {"X": "1"}}), inputs)
    for path, sha in inputs.items():
        if sha != other:
            assert key != cache_key("t1", DRAW, {**inputs, path: other})
    assert key != cache_key("t1", DRAW, {**inputs, "new": other})


def test_the_journal_keeps_the_latest_entries_across_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "MAX_CACHED", 3)
    journal = Journal(tmp_path)
    for key in ("k0", "k1", "k2", "k3"):
        journal.remember(key, f"entry of {key}")
    journal.close()
    journal = Journal(tmp_path)
    assert journal.cached("k0") is None, "the oldest beyond the bound went"
    assert journal.cached("k3") == "entry of k3" and journal.cached("other") is None
    journal.drop("k3")
    assert journal.cached("k3") is None and journal.cached("k1") == "entry of k1"
    journal.close()


def test_a_hit_copies_verified_outputs_and_a_missing_one_runs_the_task(tmp_path: Path) -> None:
    store = ResourceStore((tmp_path / "store").as_uri())
    journal = Journal(None)
    runner = TaskRunner(store, ["shell"], cache=journal)
    never = threading.Event()

    def run(artifact_id: str, scope: str | None = "t") -> dict[str, object]:
        job = task_job(DRAW, artifact_id=artifact_id).model_copy(update={"cache_scope": scope})
        return runner.run(job, "w0", never)

    try:
        first = run("a1")
        assert "cached" not in first
        hit = run("a2")
        assert hit["cached"] == {"artifact_id": "a1", "job_id": 0, "attempt": 1}
        outputs = hit["outputs"]
        assert isinstance(outputs, dict) and outputs["out"]["url"].startswith(
            store.artifact_root("a2") + "/"
        )
        assert outputs["out"]["sha256"] == first["outputs"]["out"]["sha256"]  # type: ignore[index]
        assert "cached" not in run("a3", scope=None), "no scope (an old scheduler): it runs"
        # The entry names a2's copy now; gone from the store, the task runs again.
        store.delete(outputs["out"]["url"])
        assert "cached" not in run("a4")
        assert run("a5")["cached"] == {"artifact_id": "a4", "job_id": 0, "attempt": 1}
    finally:
        runner.close()
        journal.close()
