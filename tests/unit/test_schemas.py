"""The committed JSON Schemas in schemas/ are exactly what the protocol models export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flotta_mqtt.protocol import schemas
from flotta_mqtt.protocol.topics import Channel

COMMITTED = Path(__file__).resolve().parents[2] / "schemas"


def write_rendered(directory: Path) -> dict[str, str]:
    files = schemas.render()
    for name, text in files.items():
        (directory / name).write_text(text)
    return files


def test_the_default_dir_is_the_repository_schemas_dir() -> None:
    assert schemas.DEFAULT_DIR == COMMITTED


def test_committed_schemas_match_the_models() -> None:
    stale = schemas.drift(COMMITTED)
    assert stale == [], (
        f"schemas/ drifted from the models: {stale}; "
        "regenerate with `python -m flotta_mqtt.protocol.schemas`"
    )
    assert schemas.main(["--check", str(COMMITTED)]) == 0


def test_there_is_one_schema_per_channel_user_document_and_product_protocol() -> None:
    files = schemas.render()
    expected = {f"{channel}.schema.json" for channel in Channel} | {"workflow.schema.json"}
    expected |= {"secagg.schema.json", "task-params.schema.json"}
    assert set(files) == expected
    for name, text in files.items():
        schema = json.loads(text)
        assert schema["$id"].endswith(name)
        assert "$comment" in schema


def test_a_fresh_export_has_no_drift(tmp_path: Path) -> None:
    assert schemas.main([str(tmp_path)]) == 0
    assert schemas.drift(tmp_path) == []


@pytest.mark.parametrize("name", sorted(schemas.render()))
def test_drift_names_a_changed_file(tmp_path: Path, name: str) -> None:
    files = write_rendered(tmp_path)
    schema = json.loads(files[name])
    schema["title"] = "edited by hand"
    (tmp_path / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    assert schemas.drift(tmp_path) == [name]
    assert schemas.main(["--check", str(tmp_path)]) == 1


def test_drift_names_missing_and_extra_files(tmp_path: Path) -> None:
    write_rendered(tmp_path)
    (tmp_path / "jobs.schema.json").unlink()
    (tmp_path / "retired.schema.json").write_text("{}\n")
    assert schemas.drift(tmp_path) == ["jobs.schema.json", "retired.schema.json"]


def test_drift_notices_a_whitespace_only_change(tmp_path: Path) -> None:
    write_rendered(tmp_path)
    path = tmp_path / "events.schema.json"
    path.write_text(path.read_text().rstrip("\n"))
    assert schemas.drift(tmp_path) == ["events.schema.json"]
