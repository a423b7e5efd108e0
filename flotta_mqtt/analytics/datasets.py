"""Workers' local data: CSV and Parquet files, or a table of a SQL database (databases.py).

Aggregates are computed by the engine (engine.py) in one scan of the files, in place;
operations that need the rows (models, quantiles) read them column-wise in batches with
pyarrow. Either way only the columns a job names are read, so a file larger than memory
works. A project's files must share their columns; their types are unified (integers and
floats meet as float64) and can be set per column where CSV type inference guesses wrong.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flotta_mqtt.analytics import engine
from flotta_mqtt.analytics.categories import Category, fitted, validated
from flotta_mqtt.analytics.copies import ColumnarCopy
from flotta_mqtt.analytics.databases import SqlDataset, SqlSource, same_kind
from flotta_mqtt.analytics.plan import Groups, Request, answer
from flotta_mqtt.analytics.policy import PrivacyPolicy
from flotta_mqtt.analytics.registry import (
    DEFAULT_MIN_GROUP_SIZE,
    Dataset,
    OperationError,
)

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zst")
ENGINE_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.zst")  # what DuckDB streams itself
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_BLOCK_BYTES = 8 << 20  # bigger blocks parse faster; types are inferred from the first
PARQUET_BATCH_ROWS = 1 << 17


class DatasetSpec(BaseModel):
    """One project's data on a worker (`datasets: {project: ...}` in its config).

    Either a list of files, or a mapping with `paths` (or `sql`: a database table, see
    databases.SqlSource), `min_group_size` (the fewest rows
    an exact aggregate may cover; default 5), `types` (column → arrow type name, e.g.
    `{"code": "string"}` for a CSV column of digits that must stay text), `categories`
    (column → the values a text or integer column takes; others read as missing: see
    categories.py), `privacy` (the site's policy: differential privacy only, from
    epsilon 1, unless it says otherwise) and `columnar_copy` (files: whether the worker
    answers from a copy in the engine's storage while the files are unchanged; default
    true, see copies.py).
    """

    model_config = ConfigDict(extra="forbid")

    paths: list[Path] = Field(default_factory=list)
    sql: SqlSource | None = None
    min_group_size: int = Field(default=DEFAULT_MIN_GROUP_SIZE, ge=1)
    types: dict[str, str] = Field(default_factory=dict)
    categories: dict[str, list[Category]] = Field(default_factory=dict)
    privacy: PrivacyPolicy = Field(default_factory=PrivacyPolicy)
    # Files only: keep a columnar copy in the worker's state to answer from (copies.py).
    columnar_copy: bool = True

    @model_validator(mode="before")
    @classmethod
    def _from_paths(cls, data: Any) -> Any:
        return {"paths": data} if isinstance(data, list | tuple) else data

    @field_validator("categories")
    @classmethod
    def _categories(cls, categories: dict[str, list[Category]]) -> dict[str, list[Category]]:
        return validated(categories)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if bool(self.paths) == (self.sql is not None):
            raise ValueError("give the data's files (paths) or a database table (sql)")
        return self


def open_dataset(project: str, node: str, spec: DatasetSpec) -> Dataset:
    """The dataset a spec describes: its files, or its database table."""
    if spec.sql is not None:
        return SqlDataset(
            project, node, spec.sql, spec.types, spec.min_group_size, spec.privacy, spec.categories
        )
    return FileDataset(project, node, spec)


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise ValueError(
        f"{path}: unknown data file type (expected {', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)})"
    )


def _csv_read_options() -> pacsv.ReadOptions:
    return pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)


def _csv_convert_options(
    columns: Sequence[str] | None, types: dict[str, pa.DataType]
) -> pacsv.ConvertOptions:
    # An empty CSV cell is a missing value, for strings as for numbers (as the engine reads).
    return pacsv.ConvertOptions(
        include_columns=list(columns) if columns is not None else None,
        column_types=types,
        null_values=list(engine.NULL_TEXTS),
        strings_can_be_null=True,
    )


def _file_schema(path: Path, types: dict[str, pa.DataType]) -> pa.Schema:
    if _kind(path) == "parquet":
        return pq.ParquetFile(path).schema_arrow
    reader = pacsv.open_csv(
        path, read_options=_csv_read_options(), convert_options=_csv_convert_options(None, types)
    )
    try:
        return reader.schema
    finally:
        reader.close()


def _plain(type_: pa.DataType) -> pa.DataType:
    """Dictionary-encoded columns (pandas categoricals) are read as their values."""
    return type_.value_type if pa.types.is_dictionary(type_) else type_


def _unify(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    a, b = _plain(a), _plain(b)
    if a == b:
        return a
    numeric = pa.types.is_integer, pa.types.is_floating
    if any(f(a) for f in numeric) and any(f(b) for f in numeric):
        return pa.float64()
    if pa.types.is_string(a) and pa.types.is_large_string(b):
        return b
    if pa.types.is_large_string(a) and pa.types.is_string(b):
        return a
    return None


class FileDataset(Dataset):
    """A project's CSV and/or Parquet files on one worker, chosen by file suffix."""

    def __init__(self, project: str, node: str, spec: DatasetSpec) -> None:
        super().__init__(project, node, spec.min_group_size, spec.privacy)
        missing = [str(p) for p in spec.paths if not p.is_file()]
        if missing:
            raise OperationError(f"worker {node}: data files not found: {', '.join(missing)}")
        self.paths = spec.paths
        self._rows: int | None = None
        engine.database()
        try:
            self._types = {column: pa.type_for_alias(name) for column, name in spec.types.items()}
            self._schema = self._unified_schema()
        except (ValueError, pa.ArrowException) as exc:
            raise OperationError(f"worker {node}: project {project}: {exc}") from exc
        self._who = f"worker {node}: project {project}"
        self.categories = fitted(self._schema, spec.categories, self._who)
        # Not of a bzip2 CSV: the engine would pull its rows from Python threads, and a
        # copy interrupted so could crash the process at its exit.
        self.copy = (
            ColumnarCopy(
                self.paths, engine.copy_statement(self._file_source(), self._schema), self._who
            )
            if spec.columnar_copy and self._engine_reads()
            else None
        )

    def start(self, folder: Path | None) -> None:
        if self.copy is not None and folder is not None:
            self.copy.start(folder)

    def close(self) -> None:
        if self.copy is not None:
            self.copy.close()

    def _unified_schema(self) -> pa.Schema:
        schemas = [(path, _file_schema(path, self._types)) for path in self.paths]
        first_path, first = schemas[0]
        fields = {f.name: _plain(f.type) for f in first}
        for path, schema in schemas[1:]:
            if schema.names != first.names:
                raise ValueError(
                    f"{path.name} has columns {schema.names}, {first_path.name} {first.names}"
                )
            for f in schema:
                unified = _unify(fields[f.name], f.type)
                if unified is None:
                    raise ValueError(
                        f"column {f.name} is {fields[f.name]} in {first_path.name} but "
                        f"{f.type} in {path.name}"
                    )
                fields[f.name] = unified
        for name, type_ in self._types.items():
            if name not in fields:
                raise ValueError(f"types names column {name}, which the files do not have")
            for path, schema in schemas:
                found = _plain(schema.field(name).type)
                if _kind(path) == "parquet" and not same_kind(found, type_):
                    raise ValueError(
                        f"column {name} is {found} in {path.name} but the site declares "
                        f"{type_} (types)"
                    )
            fields[name] = type_
        return pa.schema(list(fields.items()))

    def schema(self) -> pa.Schema:
        return self._schema

    def batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        if not columns:
            raise ValueError("batches() needs at least one column")
        target = pa.schema([self._schema.field(c) for c in columns])
        for path in self.paths:
            yield from self._read(path, target)

    def _read(self, path: Path, target: pa.Schema) -> Iterator[pa.RecordBatch]:
        try:
            yield from self._read_file(path, target)
        except pa.ArrowException as exc:
            # Arrow's message may quote a value of the file: only its kind leaves the site.
            raise OperationError(
                f"worker {self.node}: cannot read {path.name} of project {self.project} "
                f"({type(exc).__name__}): a value does not fit its column's type, or the "
                "file is damaged; set the column's type in the dataset's `types`"
            ) from None

    def _read_file(self, path: Path, target: pa.Schema) -> Iterator[pa.RecordBatch]:
        if _kind(path) == "csv":
            types = {f.name: f.type for f in target}
            reader = pacsv.open_csv(
                path,
                read_options=_csv_read_options(),
                convert_options=_csv_convert_options(target.names, types),
            )
            with reader:
                yield from reader
            return
        for batch in pq.ParquetFile(path).iter_batches(
            batch_size=PARQUET_BATCH_ROWS, columns=target.names
        ):
            yield batch if batch.schema == target else batch.cast(target)

    def _engine_reads(self) -> bool:
        """Whether the engine reads every file itself (not a bzip2 CSV)."""
        readable = ENGINE_CSV_SUFFIXES + PARQUET_SUFFIXES
        return all(p.name.lower().endswith(readable) for p in self.paths)

    def _file_source(self) -> str:
        csv = [p for p in self.paths if _kind(p) == "csv"]
        parquet = [p for p in self.paths if _kind(p) == "parquet"]
        return engine.file_source(csv, parquet, self._schema)

    def aggregate(self, requests: Sequence[Request]) -> list[Groups]:
        """One scan by the engine: of the files' copy while they are unchanged, else of
        the files in place; a bzip2 CSV, which it cannot read, is streamed to it."""
        if self.copy is None:
            return self._aggregate_in_place(requests)
        with self.copy.reading() as copied:
            if copied is not None:
                try:
                    return answer(
                        requests,
                        lambda s: engine.scan(
                            copied.source, s, self._schema, self._who, self.categories, True
                        ),
                    )
                except (engine.EngineError, ValueError):
                    found = self._aggregate_in_place(requests)  # raises if the job is at fault
                    self.copy.give_up(copied)  # the files answered: the copy is at fault
                    return found
        return self._aggregate_in_place(requests)

    def _aggregate_in_place(self, requests: Sequence[Request]) -> list[Groups]:
        if not self._engine_reads():
            return super().aggregate(requests)
        return self._scan(requests, self._file_source())

    def _scan(self, requests: Sequence[Request], source: str) -> list[Groups]:
        try:
            return answer(
                requests, lambda s: engine.scan(source, s, self._schema, self._who, self.categories)
            )
        except (engine.EngineError, ValueError) as exc:
            # As `_read`: the engine's message may quote a value of the file.
            raise OperationError(
                f"{self._who}: cannot read its files ({exc}): a value does not fit its "
                "column's type, or a file is damaged; set the column's type in the "
                "dataset's `types`"
            ) from None

    def count_rows(self) -> int:
        """Parquet's count is in its metadata; a CSV's costs one pass, once per worker."""
        if self._rows is None:
            self._rows = sum(self._count(path) for path in self.paths)
        return self._rows

    def _count(self, path: Path) -> int:
        if _kind(path) == "parquet":
            return int(pq.ParquetFile(path).metadata.num_rows)
        lines = _plain_lines(path)
        if lines is not None:
            return max(0, lines - 1)  # less the header
        first = pa.schema([self._schema.field(0)])
        return sum(batch.num_rows for batch in self._read(path, first))


def _plain_lines(path: Path) -> int | None:
    """The lines of an uncompressed file with no quote, carriage return or blank line.

    In such a CSV every newline ends a row, so counting them (at memory speed) counts the
    rows; any other file returns None and is parsed instead.
    """
    if path.suffix.lower() != ".csv":
        return None
    lines, last = 0, b"\n"
    with path.open("rb") as f:
        while chunk := f.read(16 << 20):
            blank = b"\n\n" in chunk or (last == b"\n" and chunk.startswith(b"\n"))
            if blank or b'"' in chunk or b"\r" in chunk:
                return None
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")
