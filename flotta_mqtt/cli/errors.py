"""How the `flotta-mqtt` command fails: one line on stderr and an exit code a script can test.

A traceback helps whoever debugs flotta_mqtt, not whoever mistyped a path; `--debug` (or
FLOTTA_DEBUG=1) shows it. The codes are listed in the README's command-line section.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from flotta_mqtt.transport.base import BusError

OK = 0
FAILED = 1  # the artifact failed or was cancelled; or an unexpected error (a bug)
INVALID = 2  # invalid input: options, files, settings, an unknown artifact
TIMED_OUT = 3
BROKER = 4  # the broker is unreachable, refused us, or our identity is already connected

errors = Console(stderr=True)
_debug = False


def set_debug(on: bool) -> None:
    """Show tracebacks instead of one-line errors (the global --debug option)."""
    global _debug
    _debug = on


def debugging() -> bool:
    return _debug or os.environ.get("FLOTTA_DEBUG", "") not in ("", "0")


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines too) made one space."""
    return " ".join(text.split())


def say(message: str) -> None:
    """Print `message` as one error line on stderr, never wrapped nor read as markup."""
    # Messages quote user input and remote errors ("[type=...]", "[1, 2]"): not rich markup.
    errors.print(f"[red]error:[/red] {escape(one_line(message))}", soft_wrap=True)


def fail(message: str, code: int = INVALID) -> typer.Exit:
    """Print `message` as an error; return the exit for the command to raise."""
    say(message)
    return typer.Exit(code=code)


def describe(exc: ValidationError) -> str:
    """A validation error as `where: what` pairs, without pydantic's links and inputs."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'value'}: "
        + error["msg"].removeprefix("Value error, ")
        for error in exc.errors(include_url=False, include_input=False)
    )


def exit_code_of(exc: Exception) -> tuple[int, str]:
    """The exit code and message for an exception no command turned into an error."""
    if isinstance(exc, ValidationError):
        return INVALID, f"invalid settings: {describe(exc)}"
    if isinstance(exc, BusError | ConnectionError):
        return BROKER, str(exc)
    if isinstance(exc, TimeoutError):
        return TIMED_OUT, str(exc) or "timed out"
    if isinstance(exc, ValueError | OSError):
        return INVALID, str(exc)
    return FAILED, f"{type(exc).__name__}: {exc} (--debug shows the traceback)"


class Command(typer.Typer):
    """The app: errors that escape a command end as one line and an exit code."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if debugging():
                raise
            code, message = exit_code_of(exc)
            say(message)
            sys.exit(code)
