"""Export the JSON Schema of every message to schemas/, so non-Python nodes can speak it.

python -m flotta_mqtt.protocol.schemas [DIR]          write the files
python -m flotta_mqtt.protocol.schemas --check [DIR]  exit 1 if they drifted
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from flotta_mqtt.model import Workflow
from flotta_mqtt.model.run import RunParams
from flotta_mqtt.protocol.codec import PAYLOADS
from flotta_mqtt.protocol.secagg import SecAggProduct
from flotta_mqtt.protocol.topics import PROTOCOL_VERSION

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "schemas"


# Files users write, beside the messages nodes exchange.
DOCUMENTS: dict[str, tuple[TypeAdapter[Any], str]] = {
    "workflow": (
        TypeAdapter(Workflow),
        "A workflow file (YAML or JSON), as `flotta-mqtt submit` reads it",
    ),
    "task-params": (
        TypeAdapter(RunParams),
        "The `params` of a workflow task of the default executor, `run`; see model/run.py",
    ),
}
# Job products with a protocol of their own: stored, named on the bus by a Resource.
PRODUCTS: dict[str, TypeAdapter[Any]] = {"secagg": TypeAdapter(SecAggProduct)}


def render() -> dict[str, str]:
    """File name → JSON text of each channel's message schema and each user document's."""
    named = (
        [
            (str(channel), adapter, f"Payload of the {channel} topics; see protocol/topics.py")
            for channel, adapter in PAYLOADS.items()
        ]
        + [(name, adapter, comment) for name, (adapter, comment) in DOCUMENTS.items()]
        + [
            (name, adapter, f"A {name} job product, stored; see protocol/{name}.py")
            for name, adapter in PRODUCTS.items()
        ]
    )
    files = {}
    for name, adapter, comment in named:
        schema = adapter.json_schema()
        schema["$id"] = f"flotta_mqtt/v{PROTOCOL_VERSION}/{name}.schema.json"
        schema["$comment"] = comment
        files[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def drift(directory: Path) -> list[str]:
    """Names of schema files missing, stale or extra in `directory`."""
    expected = render()
    present = {p.name for p in directory.glob("*.schema.json")}
    stale = [
        name
        for name, text in expected.items()
        if not (directory / name).exists() or (directory / name).read_text() != text
    ]
    return sorted(stale + sorted(present - set(expected)))


def main(argv: list[str]) -> int:
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    directory = Path(args[0]) if args else DEFAULT_DIR
    if check:
        stale = drift(directory)
        for name in stale:
            print(f"schema drifted: {directory / name}", file=sys.stderr)
        return 1 if stale else 0
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (directory / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
