"""The package's structure, checked: imports go down the layers, no part reads another's
private names, the libraries each hide behind one module, and no module or class grows
past the size at which it holds two concerns."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "flotta_mqtt"
BASE = {"model", "protocol", "transport", "logs", "sqlite", "heap"}
# What each top-level package or module may import of the others (itself always).
ALLOWED: dict[str, set[str]] = {
    "model": set(),
    "protocol": {"model"},
    "transport": {"model", "protocol"},
    "logs": set(),
    "sqlite": set(),
    "heap": set(),
    "analytics": BASE,
    "workflows": BASE,
    "client": BASE,
    "broker": BASE,
    "functions": BASE | {"client", "workflows"},
    "scheduler": BASE | {"analytics", "workflows"},
    "worker": BASE | {"analytics", "workflows"},
    "nodes": BASE | {"scheduler", "worker"},
    "dashboard": BASE | {"client"},
}
# Third-party libraries and the only modules that may import them.
HIDDEN_BEHIND = {
    "paho": ("transport/bus.py", "transport/paho_speedups.py"),
    "fsspec": ("transport/store.py",),
    "s3fs": ("transport/store.py",),
    "adlfs": ("transport/store.py",),
    "azure": ("transport/store.py",),
    # Only @distributed calls unpickle, and only bytes verified against a sha256 from the
    # bus: analytics results, models and every other product are JSON.
    "pickle": ("functions/calls.py",),
    "cloudpickle": ("functions/calls.py", "functions/handles.py", "functions/_child.py"),
    # Secure aggregation's primitives, in one module that says which it uses and why.
    "cryptography": ("analytics/secagg/crypto.py",),
    # The query engine, and the databases a site's data may live in; the scheduler's
    # PostgreSQL database and its lease.
    "duckdb": ("analytics/engine.py",),
    "psycopg": (
        "analytics/databases.py",
        "scheduler/postgres_repository.py",
        "scheduler/lease.py",
    ),
    "polars": (),
    "dill": (),
    "joblib": (),
    "marshal": (),
    "shelve": (),
}
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 400


def modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def part_of(path: Path) -> str:
    """The top-level package (or module) of the package a file belongs to."""
    first = path.relative_to(PACKAGE).parts[0]
    return first.removesuffix(".py")


def imported(tree: ast.Module) -> Iterator[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno


def our_part(module: str, names: list[str]) -> list[str]:
    """The parts of flotta_mqtt an import reaches (`from flotta_mqtt import x` reaches x)."""
    pieces = module.split(".")
    if pieces[0] != "flotta_mqtt":
        return []
    if len(pieces) > 1:
        return [pieces[1]]
    return names


def test_imports_go_down_the_layers() -> None:
    wrong = []
    for path, tree in modules():
        part = part_of(path)
        if part not in ALLOWED:  # cli, __init__, __main__: the top may use everything
            continue
        for module, names, line in imported(tree):
            for target in our_part(module, names):
                if target != part and target not in ALLOWED[part]:
                    wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert wrong == []


def test_no_part_imports_another_parts_private_names() -> None:
    wrong = []
    for path, tree in modules():
        part = part_of(path)
        for module, names, line in imported(tree):
            targets = our_part(module, names)
            if not targets or targets == [part]:
                continue
            private_module = any(piece.startswith("_") for piece in module.split(".")[1:])
            private_names = [name for name in names if name.startswith("_")]
            if (private_module and not module.endswith("__main__")) or private_names:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} {module} {private_names}")
    assert wrong == []


@pytest.mark.parametrize("library", sorted(HIDDEN_BEHIND))
def test_each_library_is_imported_by_its_own_modules_only(library: str) -> None:
    owners = {PACKAGE / owner for owner in HIDDEN_BEHIND[library]}
    wrong = []
    for path, tree in modules():
        for module, _, line in imported(tree):
            if module.split(".")[0] == library and path not in owners:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line}")
    assert wrong == []


def test_no_module_or_class_holds_two_concerns_by_size() -> None:
    too_big = []
    for path, tree in modules():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{path.relative_to(PACKAGE)}: class {node.name} {size} lines")
    assert too_big == []
