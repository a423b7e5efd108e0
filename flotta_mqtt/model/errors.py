"""Errors the model raises: each names what is wrong in the user's own terms."""

from pydantic import ValidationError


def describe(exc: ValidationError, subject: str, most: int = 5) -> str:
    """A validation failure as one line: `field.path: what is wrong; …` (the first few)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or subject}: {error['msg']}"
        for error in exc.errors(include_url=False)[:most]
    )


class BindingError(ValueError):
    """Steps that cannot be bound into a DAG of jobs (bad distribution, no workers...)."""


class IllegalTransition(ValueError):
    """A state change that the job or artifact state machine does not allow."""


class StaleAttempt(ValueError):
    """An event about an attempt of a job that is no longer the current one."""
