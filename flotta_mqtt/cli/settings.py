"""A node command's settings: its config file, then its flags, then its paths made absolute.

Paths are resolved once, at start, against the directory the command was started in:
parts of a node run elsewhere (the python executor's call processes have a working
directory of their own), so a relative path would name another place there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from flotta_mqtt.analytics import DatasetSpec
from flotta_mqtt.cli.errors import describe, fail
from flotta_mqtt.scheduler.config import SchedulerConfig
from flotta_mqtt.transport.settings import StorageSettings, load_yaml
from flotta_mqtt.worker.config import WorkerConfig

Config = TypeVar("Config", SchedulerConfig, WorkerConfig)
FILE = "file://"


def node_config(
    model: type[Config],
    path: Path | None,
    overrides: dict[str, Any],
    initiator_password: str | None = None,
) -> Config:
    """The settings of `path` (YAML), overridden by the flags given, paths made absolute.

    With `initiator_password`, a scheduler's embedded initiator connects as its own
    identity (NAME.initiator) with that password, elsewhere as the scheduler does."""
    try:
        data = load_yaml(path) if path else {}
    except ValueError as exc:
        raise fail(str(exc)) from None
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        elif value is not None:
            data[key] = value
    if initiator_password is not None:
        name = data.get("name", SchedulerConfig.model_fields["name"].default)
        identity = {"username": f"{name}.initiator", "password": initiator_password}
        data["initiator_broker"] = {**data.get("broker", {}), **identity}
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        raise fail(f"invalid settings: {describe(exc)}") from None
    return absolute(config)


def absolute_storage(storage: StorageSettings) -> StorageSettings:
    """`storage` with a relative file:// URL (`file://./flotta-store`) made absolute."""
    if not storage.url.startswith(FILE) or storage.url[len(FILE) :].startswith("/"):
        return storage
    folder = Path(storage.url[len(FILE) :]).absolute()
    return storage.model_copy(update={"url": folder.as_uri()})


def absolute(config: Config) -> Config:
    """`config` with every path in it absolute (see the module's docstring)."""
    update: dict[str, Any] = {"storage": absolute_storage(config.storage)}
    if isinstance(config, SchedulerConfig):
        database = config.database
        update["database"] = database.absolute() if isinstance(database, Path) else database
        update["registry"] = config.registry.absolute() if config.registry else None
    else:
        state = config.state_dir or Path("flotta-state") / config.name
        update["state_dir"] = state.absolute()
        update["datasets"] = {
            project: _absolute_paths(spec) for project, spec in config.datasets.items()
        }
        update["policy"] = config.policy.absolute()
    return config.model_copy(update=update)


def _absolute_paths(spec: DatasetSpec) -> DatasetSpec:
    return spec.model_copy(update={"paths": [path.absolute() for path in spec.paths]})
