"""Local datasets from CSV files, streamed row by row so any size fits in memory."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flotta_mqtt.roles.operations.registry import Dataset, OperationError


def _value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


class CsvDataset(Dataset):
    """One project's data on one worker: CSV files sharing a header."""

    def __init__(self, project: str, node: str, paths: list[Path]) -> None:
        super().__init__(project, node)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise OperationError(f"worker {node}: data files not found: {', '.join(missing)}")
        self.paths = paths

    def columns(self) -> list[str]:
        """The header of the first file (the files of a project share one)."""
        if not self.paths:
            return []
        with self.paths[0].open(newline="") as f:
            return next(csv.reader(f), [])

    def rows(self) -> Iterator[Mapping[str, Any]]:
        for path in self.paths:
            with path.open(newline="") as f:
                for row in csv.DictReader(f):
                    yield {k: _value(v) for k, v in row.items()}
