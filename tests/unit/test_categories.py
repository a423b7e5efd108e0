"""Declared categories: every source (CSV, bzip2 CSV streamed in batches, Parquet, SQLite,
PostgreSQL, in-memory batches) reads a value outside a column's categories as missing, in
its one scan and in the column batches the models read, as a direct computation does; a
filter on an undeclared value is refused; a grouped answer lists every declared group,
noised without a threshold; an attacker's labels stay data or are refused clearly.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from postgres import BIN, postgres_server, postgres_url  # noqa: F401  (fixtures)
from pydantic import ValidationError
from test_copies import copied
from test_estimators import job
from test_query import TableDataset, reference

from flotta_mqtt import analytics as operations
from flotta_mqtt.analytics import (
    ColumnTypeError,
    DatasetSpec,
    JobContext,
    OperationError,
    PrivacyPolicy,
    PrivacyRefused,
    TooFewRows,
    open_dataset,
)
from flotta_mqtt.analytics.categories import (
    MAX_BYTES,
    MAX_TOTAL_BYTES,
    MAX_VALUES,
    fitted,
    folded,
)
from flotta_mqtt.analytics.filters import select, values
from flotta_mqtt.analytics.plan import Agg, Request
from flotta_mqtt.analytics.registry import Budget
from flotta_mqtt.model import Operation
from flotta_mqtt.model.query import AllOf, AnyOf, Compare, Filter, IsIn, Not
from flotta_mqtt.protocol.codec import MAX_MESSAGE_BYTES, encode
from flotta_mqtt.protocol.messages import NodePresence
from flotta_mqtt.worker.config import WorkerConfig

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
SCHEMA = pa.schema([("s", pa.string()), ("n", pa.int64()), ("x", pa.float64())])
# Labels with quotes, SQL text and psycopg's placeholders: data, never statement text.
WORDS = ["a", "b", "c", "a'b", 'q" OR 1=1 --', "%s", "?"]
HAS_POSTGRES = (BIN / "postgres").exists()


# --- random data, categories and filters ------------------------------------------------------


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, list[Any]], Filter]:
    rows = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "s": st.one_of(st.none(), st.sampled_from(WORDS)),
                    "n": st.one_of(st.none(), st.integers(-3, 3)),
                    "x": st.one_of(st.none(), st.floats(-3, 3).map(lambda v: round(v, 1))),
                }
            ),
            max_size=30,
        )
    )
    # Categories may name values the data lacks ("zz", 9) and leave some of it out.
    texts = draw(st.lists(st.sampled_from([*WORDS, "zz"]), min_size=1, unique=True))
    numbers = draw(st.lists(st.sampled_from([*range(-3, 4), 9]), min_size=1, unique=True))
    leaves = st.one_of(
        st.builds(
            lambda op, v: Compare(column="s", op=op, value=v),
            st.sampled_from(["==", "!="]),
            st.sampled_from(texts),
        ),
        st.builds(lambda v: IsIn(column="s", values=v), st.lists(st.sampled_from(texts))),
        st.builds(
            lambda op, v: Compare(column="n", op=op, value=v),
            st.sampled_from(["==", "!="]),
            st.sampled_from(numbers),
        ),
        st.builds(  # ordered comparisons take any value
            lambda op, v: Compare(column="n", op=op, value=v),
            st.sampled_from(["<", ">="]),
            st.integers(-4, 4),
        ),
        st.builds(lambda v: IsIn(column="n", values=v), st.lists(st.sampled_from(numbers))),
        st.builds(lambda v: Compare(column="x", op=">", value=v), st.floats(-3, 3)),
    )
    where = draw(
        st.recursive(
            leaves,
            lambda inner: st.one_of(
                st.builds(lambda fs: AllOf(filters=fs), st.lists(inner, min_size=1, max_size=3)),
                st.builds(lambda fs: AnyOf(filters=fs), st.lists(inner, min_size=1, max_size=3)),
                st.builds(lambda f: Not(filter=f), inner),
            ),
            max_leaves=6,
        )
    )
    return rows, {"s": texts, "n": numbers}, where


def expected(
    rows: list[dict[str, Any]], categories: dict[str, list[Any]], where: Filter
) -> list[dict[Any, list[Any]]]:
    """The requests of `requests`, computed row by row with undeclared values as None."""
    read = [
        {c: (v if c not in categories or v in categories[c] else None) for c, v in row.items()}
        for row in rows
    ]
    kept = [row for row in read if reference(where, row) is True]
    xs = [row["x"] for row in kept if row["x"] is not None]
    return [
        {(k,): [n] for k, n in Counter(row["s"] for row in kept).items()},
        {(k,): [n] for k, n in Counter(row["n"] for row in kept).items()},
        {(): [len(xs), math.fsum(xs)]},
    ]


def requests(where: Filter) -> list[Request]:
    return [
        Request(where, ("s",), (Agg("rows"),)),  # a grouped count
        Request(where, ("n",), (Agg("rows"),)),
        Request(where, (), (Agg("present", "x"), Agg("sum", "x"))),  # a filtered mean
    ]


def same(found: list[dict[Any, list[Any]]], wanted: list[dict[Any, list[Any]]]) -> bool:
    return all(
        f.keys() == w.keys()
        and all(
            math.isclose(a, b, abs_tol=1e-9) for k in w for a, b in zip(f[k], w[k], strict=True)
        )
        for f, w in zip(found, wanted, strict=True)
    )


@contextlib.contextmanager
def file_sources(
    rows: list[dict[str, Any]], categories: dict[str, list[Any]], folder: Path
) -> Iterator[dict[str, Any]]:
    """The same rows as CSV, bzip2 CSV (streamed to the engine), Parquet, SQLite, batches,
    and a CSV's and a Parquet file's columnar copies."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    folder.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, folder / "t.csv")
    with pa.CompressedOutputStream(str(folder / "t.csv.bz2"), "bz2") as out:
        pacsv.write_csv(table, out)
    pq.write_table(table, folder / "t.parquet", row_group_size=4)
    with sqlite3.connect(folder / "t.db") as con:
        con.execute("CREATE TABLE t (s TEXT, n INTEGER, x REAL)")
        con.executemany("INSERT INTO t VALUES (?, ?, ?)", [[r["s"], r["n"], r["x"]] for r in rows])
    con.close()
    types = {"s": "string", "n": "int64", "x": "double"}
    specs: dict[str, dict[str, Any]] = {
        "csv": {"paths": [folder / "t.csv"], "types": types},
        "csv.bz2": {"paths": [folder / "t.csv.bz2"], "types": types},
        "parquet": {"paths": [folder / "t.parquet"]},
        "sqlite": {"sql": {"url": f"sqlite:///{folder / 't.db'}", "table": "t"}},
    }
    found = {
        name: open_dataset(
            "p", "w0", DatasetSpec.model_validate({**spec, "categories": categories})
        )
        for name, spec in specs.items()
    }
    batches = TableDataset(table)
    batches.categories = fitted(SCHEMA, categories, "w0")
    found["batches"] = batches
    with contextlib.ExitStack() as stack:
        for name in ("csv", "parquet"):  # their columnar copies (copies.py)
            spec = {**specs[name], "categories": categories}
            copy = stack.enter_context(copied(spec, folder / f"{name}.copy"))
            found[f"{name} copied"] = copy
        yield found


def postgres_source(url: str, rows: list[dict[str, Any]], categories: dict[str, list[Any]]) -> Any:
    with psycopg.connect(url, autocommit=True) as con:
        con.execute("DROP TABLE IF EXISTS t")
        con.execute("CREATE TABLE t (s text, n bigint, x double precision)")
        with con.cursor().copy("COPY t (s, n, x) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row["s"], row["n"], row["x"]])
    spec = {"sql": {"url": url, "table": "t"}, "categories": categories}
    return open_dataset("p", "w0", DatasetSpec.model_validate(spec))


def agrees(
    data: Any, rows: list[dict[str, Any]], categories: dict[str, Any], where: Filter
) -> None:
    """The source's one scan, and the column batches the models read, give the oracle's."""
    wanted = expected(rows, categories, where)
    found = data.aggregate(requests(where))
    assert same(found, wanted), (found, wanted)
    xs = [v for batch in select(data, ["x"], where, numbers=["x"]) for v in values(batch, "x")]
    assert same([{(): [len(xs), math.fsum(xs)]}], wanted[2:])


@SETTINGS
@given(cases())
def test_every_file_source_reads_undeclared_values_as_missing_as_python_does(
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[list[dict[str, Any]], dict[str, list[Any]], Filter],
) -> None:
    rows, categories, where = case
    with file_sources(rows, categories, tmp_path_factory.mktemp("c")) as found:
        for name, data in found.items():
            try:
                agrees(data, rows, categories, where)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None


@pytest.mark.skipif(not HAS_POSTGRES, reason="no PostgreSQL server binaries")
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_a_postgresql_table_reads_undeclared_values_as_missing_as_python_does(
    postgres_url: str,  # noqa: F811
    case: tuple[list[dict[str, Any]], dict[str, list[Any]], Filter],
) -> None:
    rows, categories, where = case
    agrees(postgres_source(postgres_url, rows, categories), rows, categories, where)


# --- filters on undeclared values ----------------------------------------------------------------

ROWS = [{"s": s, "n": i % 3, "x": float(i)} for i, s in enumerate(["a", "b", "typo", "a", None])]


def batches(categories: dict[str, list[Any]], rows: list[dict[str, Any]] = ROWS) -> Any:
    data = TableDataset(pa.Table.from_pylist(rows, schema=SCHEMA))
    data.categories = fitted(SCHEMA, categories, "w0")
    return data


@pytest.mark.parametrize(
    "where",
    [
        Compare(column="s", op="==", value="typo"),
        Compare(column="s", op="!=", value="A"),
        IsIn(column="s", values=["a", "c"]),
        Not(
            filter=AllOf(
                filters=[Compare(column="x", op=">", value=0), IsIn(column="n", values=[2.5])]
            )
        ),
        Compare(column="n", op="==", value=7),
    ],
)
def test_a_filter_on_a_value_outside_the_declared_categories_is_refused(where: Filter) -> None:
    data = batches({"s": ["a", "b"], "n": [0, 1, 2]})
    column = next(iter(where.columns() - {"x"}))
    declared = "'a', 'b'" if column == "s" else "0, 1, 2"
    message = (
        f"in column {column} of project p, which takes only its declared categories: {declared}"
    )
    data.privacy = PrivacyPolicy(exact=True)
    where_ = where.model_dump(mode="json")
    for run in (
        lambda: grouped(data, "count", where=where_),  # checked, then one scan
        lambda: grouped(data, "group_count", by=["n"], where=where_),
        lambda: list(select(data, ["x"], where)),  # the column batches the models read
    ):
        with pytest.raises(ColumnTypeError, match=f"worker w0: the filter looks for .*{message}$"):
            run()


def test_declared_values_and_ordered_comparisons_pass_the_check() -> None:
    data = batches({"s": ["a", "b"], "n": [0, 1, 2]})
    where = AllOf(
        filters=[IsIn(column="s", values=["a", "b"]), Compare(column="n", op="<", value=7)]
    )
    (found, _, _) = data.aggregate(requests(where))
    assert found == {("a",): [2], ("b",): [1]}  # "typo" reads as missing: no row passes


def test_an_error_lists_a_few_of_many_declared_values() -> None:
    data = batches({"s": [f"v{i}" for i in range(100)]})
    with pytest.raises(ColumnTypeError, match=r"'v8', 'v9', \.\.\. \(100 in all\)$"):
        list(select(data, ["x"], Compare(column="s", op="==", value="v100")))


# --- grouped answers: the declared groups are the public keys ---------------------------------


class Unlimited(Budget):
    def spend(self, project: str, epsilon: float, delta: float, policy: PrivacyPolicy) -> None:
        pass


def grouped(data: Any, name: str = "group_count", **params: Any) -> Any:
    """A grouped statistic of one worker, finalized as the initiator would."""
    by = {"by": ["s"]} if name.startswith("group") and "by" not in params else {}
    operation = Operation(name=name, params={**by, **params})
    local = JobContext(job(operation, "local"), "w0", [], data, Unlimited())
    product = json.loads(json.dumps(operations.run(local)))
    return operations.run(JobContext(job(operation, "aggregate"), "i", [product], None))


def test_exact_groups_list_every_declared_value_and_refuse_small_ones() -> None:
    rows = [{"s": "a", "n": 1, "x": 1.0}] * 6 + [{"s": "typo", "n": 1, "x": 2.0}] * 5
    data = batches({"s": ["a", "b", "c"]}, rows)
    data.privacy = PrivacyPolicy(exact=True)
    data.min_group_size = 5
    assert grouped(data) == [  # b and c, empty, are listed; "typo" is missing (None)
        {"s": None, "count": 5},
        {"s": "a", "count": 6},
        {"s": "b", "count": 0},
        {"s": "c", "count": 0},
    ]
    assert grouped(data, "group_mean", column="x")[1] == {"s": "a", "count": 6, "mean": 1.0}
    small = batches({"s": ["a", "b", "c"]}, [*rows, {"s": "b", "n": 1, "x": 1.0}])
    small.privacy, small.min_group_size = PrivacyPolicy(exact=True), 5
    with pytest.raises(TooFewRows):
        grouped(small)


def test_noised_groups_are_every_declared_value_so_a_rare_one_does_not_show() -> None:
    """With or without the one row of `rare`, the same groups come back, each noised;
    no delta is needed, since no group is dropped."""
    common = [{"s": "a", "n": 1, "x": 1.0}] * 40
    keys = []
    for rows in (common, [*common, {"s": "rare", "n": 1, "x": 1.0}]):
        data = batches({"s": ["a", "rare", "never"]}, rows)
        for name, extra in (
            ("group_count", {}),
            ("group_mean", {"column": "x", "bounds": {"x": [0, 2]}}),
        ):
            released = grouped(data, name, epsilon=1.0, **extra)
            assert released["mechanism"] == "laplace"
            keys.append([row["s"] for row in released["value"]])
    assert keys == [[None, "a", "never", "rare"]] * 4
    # A column with no declared categories still needs the threshold, and so delta.
    data = batches({"n": [1]}, common)
    with pytest.raises(PrivacyRefused, match="unless the site declares the categories"):
        grouped(data, epsilon=1.0)
    assert grouped(data, epsilon=1.0, delta=1e-6)["mechanism"] == "laplace_threshold"


def test_a_summary_lists_the_declared_groups_as_the_statistic_alone_does() -> None:
    data = batches({"s": ["a", "b"]}, [{"s": "a", "n": 1, "x": 1.0}] * 6)
    data.privacy = PrivacyPolicy(exact=True)
    operations_ = {"g": {"name": "group_count", "params": {"by": ["s"]}}}
    assert grouped(data, "summary", operations=operations_) == {"g": grouped(data)}
    assert [row["s"] for row in grouped(data)] == [None, "a", "b"]


def test_beyond_the_limit_of_combinations_only_the_groups_found_are_listed() -> None:
    rows = [{"s": "v1", "n": 1, "x": 1.0}] * 5
    data = batches({"s": [f"v{i}" for i in range(200)], "n": list(range(100))}, rows)
    data.privacy = PrivacyPolicy(exact=True)
    assert grouped(data, by=["s", "n"]) == [{"s": "v1", "n": 1, "count": 5}]  # 201 x 101 > 10,000
    assert len(grouped(data, by=["n"])) == 101


def test_noised_counts_of_declared_groups_are_centred_on_the_truth() -> None:
    data = batches({"s": ["a", "b"]}, [{"s": "a", "n": 1, "x": 1.0}] * 30)
    draws = [grouped(data, epsilon=1.0)["value"] for _ in range(200)]
    means = {
        key: sum(next(r["count"] for r in d if r["s"] == key) for d in draws) / 200
        for key in ("a", "b")
    }
    assert abs(means["a"] - 30) < 1.0 and means["b"] < 1.5  # b: |Laplace(1)| clamped at 0


# --- what a source returns is folded into the declared values --------------------------------


def test_every_key_a_source_returns_is_a_declared_value_or_none() -> None:
    """Whatever a source gives back (another case, a float for an integer, padding, NaN),
    only declared values and None leave; keys that meet add up."""
    groups = {
        ("a", 1): [1, 1.0],
        ("A", 1.0): [2, 2.0],
        ("a  ", 2.0): [4, 4.0],
        ("b", 1.5): [8, 8.0],
        ("b", math.nan): [16, 16.0],
        (None, 7): [32, 32.0],
    }
    found = folded(["s", "n"], {"s": ["a", "b"], "n": [1, 2]}, groups)
    assert found == {
        ("a", 1): [1, 1.0],
        (None, 1): [2, 2.0],
        (None, 2): [4, 4.0],
        ("b", None): [24, 24.0],
        (None, None): [32, 32.0],
    }
    assert [type(key[1]) for key in found if key[1] is not None] == [int, int, int]
    assert folded(["s", "x"], {"s": ["a"]}, {("A", 0.5): [1]}) == {(None, 0.5): [1]}


def released_keys(data: Any, by: str) -> list[list[Any]]:
    """The groups `data` releases exactly (min_group_size 5) and noised, each statistic."""
    keys = []
    for exact in (True, False):
        data.privacy = PrivacyPolicy(exact=exact)
        data.min_group_size = 5
        noise: dict[str, Any] = {} if exact else {"epsilon": 1.0}
        for name, extra in (
            ("group_count", {}),
            ("group_mean", {"column": "x"} if exact else {"column": "x", "bounds": {"x": [0, 2]}}),
        ):
            released = grouped(data, name, by=[by], **noise, **extra)
            rows = released if exact else released["value"]
            keys.append([row[by] for row in rows])
    return keys


def sqlite_table(path: Path, columns: str, rows: list[tuple[Any, ...]]) -> str:
    with sqlite3.connect(path) as con:
        con.execute(f"CREATE TABLE t ({columns})")
        con.executemany(f"INSERT INTO t VALUES ({', '.join('?' * len(rows[0]))})", rows)
    con.close()
    return f"sqlite:///{path}"


def test_a_nocase_sqlite_column_releases_no_undeclared_value(tmp_path: Path) -> None:
    """'A' equals 'a' under the column's NOCASE collation: it must still read as missing."""
    rows = [(s, 1.0) for s in ["a", "A", "b"] for _ in range(6)]
    url = sqlite_table(tmp_path / "t.db", "s TEXT COLLATE NOCASE, x REAL", rows)
    spec = {"sql": {"url": url, "table": "t"}, "categories": {"s": ["a", "b"]}}
    data = open_dataset("p", "w0", DatasetSpec.model_validate(spec))
    (found,) = data.aggregate([Request(None, ("s",), (Agg("rows"),))])  # at the source
    assert found == {(None,): [6], ("a",): [6], ("b",): [6]}
    assert released_keys(data, "s") == [[None, "a", "b"]] * 4


def test_a_sqlite_real_column_read_as_integers_releases_the_declared_integers(
    tmp_path: Path,
) -> None:
    """SQLite returns 1.0 from a REAL column typed int64: it is the declared 1, not a group
    of its own; 1.5 is no declared value."""
    rows = [(n, 1.0) for n in [1, 2, 1.5] for _ in range(6)]
    url = sqlite_table(tmp_path / "t.db", "n REAL, x REAL", rows)
    spec = {
        "sql": {"url": url, "table": "t"},
        "types": {"n": "int64"},
        "categories": {"n": [1, 2, 3]},
    }
    data = open_dataset("p", "w0", DatasetSpec.model_validate(spec))
    assert released_keys(data, "n") == [[None, 1, 2, 3]] * 4
    data.privacy = PrivacyPolicy(exact=True)
    assert [(r["n"], type(r["n"]), r["count"]) for r in grouped(data, by=["n"])] == [
        (None, type(None), 6),
        (1, int, 6),
        (2, int, 6),
        (3, int, 0),
    ]


@pytest.mark.skipif(not HAS_POSTGRES, reason="no PostgreSQL server binaries")
def test_a_postgresql_char_column_releases_its_declared_values_unpadded(
    postgres_url: str,  # noqa: F811
) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as con:
        con.execute("DROP TABLE IF EXISTS t")
        con.execute("CREATE TABLE t (s char(3), x double precision)")
        with con.cursor().copy("COPY t (s, x) FROM STDIN") as copy:
            for s in ["a", "b", "c"]:
                for _ in range(6):
                    copy.write_row([s, 1.0])
    spec = {"sql": {"url": postgres_url, "table": "t"}, "categories": {"s": ["a", "b"]}}
    data = open_dataset("p", "w0", DatasetSpec.model_validate(spec))
    (found,) = data.aggregate([Request(None, ("s",), (Agg("rows"),))])  # at the source
    assert found == {(None,): [6], ("a",): [6], ("b",): [6]}
    assert released_keys(data, "s") == [[None, "a", "b"]] * 4


# --- the spec: limits and an attacker's labels -----------------------------------------------


def spec(categories: Any, **more: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"paths": ["/data/t.csv"], "categories": categories, **more})


@pytest.mark.parametrize(
    ("categories", "message"),
    [
        ({"s": []}, "categories of s: declare at least one value"),
        ({"s": ["a", "b", "a"]}, "categories of s: 'a' is declared twice"),
        ({"s": ["a", 1]}, "categories of s mix text and integers"),
        ({"s": [f"{i}" for i in range(MAX_VALUES + 1)]}, f"more than the {MAX_VALUES} allowed"),
        ({"s": [["a"]]}, "Input should be a valid string"),
        ({"s": [{"a": 1}]}, "Input should be a valid string"),
        ({"s": [True]}, "Input should be a valid string"),
        ({"s": [1.5]}, "Input should be a valid string"),
        ({"s": [2**63]}, "less than 9223372036854775808"),
        ({"s": "abc"}, "Input should be a valid list"),
    ],
)
def test_a_spec_refuses_categories_it_cannot_honour(categories: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec(categories)


def test_ten_megabytes_of_labels_are_refused_at_the_limit() -> None:
    labels = [f"{i:0>1000}" for i in range(10_000)]  # 10 MB
    with pytest.raises(ValidationError, match=f"bytes as JSON, more than the {MAX_BYTES} allowed"):
        spec({"s": labels})


def test_categories_must_name_a_column_of_their_kind(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("s,n,x\na,1,0.5\n")
    for categories, message in [
        ({"z": ["a"]}, "categories name column z, which the data lacks"),
        ({"n": ["a"]}, "the categories of column n are text but the column is int64"),
        ({"x": [1]}, "the categories of column x are integers but the column is double"),
        ({"s": [1]}, "the categories of column s are integers but the column is string"),
    ]:
        with pytest.raises(OperationError, match=f"worker w0: project p: {message}"):
            open_dataset("p", "w0", spec(categories, paths=[path]))


def test_hostile_labels_stay_data_in_every_source(tmp_path: Path) -> None:
    rows = [{"s": w, "n": 1, "x": 1.0} for w in WORDS for _ in range(2)]
    categories = {"s": WORDS[3:]}  # quotes, SQL text, %s and ?
    with file_sources(rows, categories, tmp_path) as sources:
        for name, data in sources.items():
            (found, _, _) = data.aggregate(requests(IsIn(column="s", values=WORDS[3:])))
            assert found == {(w,): [2] for w in WORDS[3:]}, name


def test_a_worker_announces_declared_categories_with_its_schema(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("s,n,x\na,1,0.5\n")
    described = open_dataset("p", "w0", spec({"s": ["a", "b"], "n": [1]}, paths=[path])).describe()
    assert described["categories"] == {"s": ["a", "b"], "n": [1]}
    assert "categories" not in open_dataset("p", "w0", spec({}, paths=[path])).describe()


def labels(size: int, prefix: str) -> list[str]:
    """Distinct labels taking about `size` bytes as JSON."""
    return [f"{prefix}{i:0>95}" for i in range(size // 100)]


def test_a_worker_refuses_datasets_whose_categories_overflow_its_presence(
    tmp_path: Path,
) -> None:
    """Each dataset within its limit, five of them made a presence over the message limit:
    the worker's configuration caps their total."""
    path = tmp_path / "t.csv"
    path.write_text("s,n,x\na,1,0.5\n")
    big = {"paths": [path], "categories": {"s": labels(MAX_BYTES - 1000, "s")}}
    with pytest.raises(
        ValidationError,
        match=rf"the datasets' categories take \d+ bytes as JSON in all, more than the "
        rf"{MAX_TOTAL_BYTES} a worker may announce",
    ):
        WorkerConfig(name="w0", datasets={f"p{i}": big for i in range(5)})
    # At the cap, every dataset's schema and categories fit in one presence.
    half = {"paths": [path], "categories": {"s": labels(MAX_TOTAL_BYTES // 2 - 100, "s")}}
    config = WorkerConfig(name="w0", datasets={"p0": half, "p1": half})
    details = {p: open_dataset(p, "w0", spec).describe() for p, spec in config.datasets.items()}
    presence = NodePresence(
        node="w0",
        online=True,
        projects=sorted(details),
        operations=sorted(operations.REGISTRY),
        details=details,
        since=0.0,
    )
    assert len(encode(presence)) < MAX_MESSAGE_BYTES
