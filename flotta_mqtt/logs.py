"""Node logging: plain text, or one JSON object per line carrying artifact and job ids.

Every JSON line has the keys `artifact_id`, `job_id`, `attempt` and `worker` (null when
the line is about no job; see `ContextFilter` for where they come from), so a log pipeline
can filter one artifact's or one job's lines. `configure_logging` installs it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any, Literal

IDS = ("artifact_id", "job_id", "attempt", "worker")
LogFormat = Literal["text", "json"]
_context: ContextVar[Mapping[str, Any]] = ContextVar(
    "flotta_log_context", default=MappingProxyType({})
)
# Attributes every LogRecord has: anything else on a record came from `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Within this block (and what it calls on this thread), log lines carry these ids."""
    token = _context.set({**_context.get(), **ids})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Give every record the id attributes: from `extra`, else the context, else None.

    In order of precedence: `extra={"artifact_id": ..., "job_id": ...}` on the logging call;
    a `JobLogger` (a LoggerAdapter bound to one job): `job_logger(log, ref).info("...")`;
    the enclosing `log_context(artifact_id=..., job_id=...)` block, which follows the code
    running inside it (a contextvar), for code that logs without knowing the job.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get()
        for name in IDS:
            if getattr(record, name, None) is None:
                setattr(record, name, context.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the ids,
    any other `extra` fields, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in IDS:
            line[name] = getattr(record, name, None)
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in line:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [artifact=… job=… attempt=…]`: ids only when known."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = " ".join(
            f"{name.removesuffix('_id')}={value}"
            for name in IDS
            if (value := getattr(record, name, None)) is not None
        )
        if not ids:
            return text
        first, newline, rest = text.partition("\n")  # keep a traceback below the ids
        return f"{first} [{ids}]{newline}{rest}"


class JobLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger bound to one job: its ids go on every line, beside the call's own `extra`."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def job_logger(
    logger: logging.Logger,
    artifact_id: str,
    job_id: int | None = None,
    attempt: int | None = None,
    worker: str | None = None,
) -> JobLogger:
    extra = {"artifact_id": artifact_id, "job_id": job_id, "attempt": attempt, "worker": worker}
    return JobLogger(logger, {k: v for k, v in extra.items() if v is not None})


def configure_logging(
    level: str | int = "INFO", fmt: LogFormat | None = None, stream: IO[str] | None = None
) -> logging.Handler:
    """Send the root logger's lines to `stream` (stderr) as text or JSON; returns the handler.

    Without `fmt`, the `FLOTTA_LOG_FORMAT` variable (`text` or `json`) chooses. Replaces
    the handlers a previous call installed (not anyone else's).
    """
    chosen = fmt or os.environ.get("FLOTTA_LOG_FORMAT", "text").lower()
    if chosen not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {chosen!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.set_name("flotta_mqtt")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "flotta_mqtt"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
