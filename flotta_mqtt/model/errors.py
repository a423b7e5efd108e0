"""Errors the model raises: each names what is wrong in the user's own terms."""


class BindingError(ValueError):
    """Steps that cannot be bound into a DAG of jobs (bad distribution, no workers...)."""


class IllegalTransition(ValueError):
    """A state change that the job or artifact state machine does not allow."""


class StaleAttempt(ValueError):
    """An event about an attempt of a job that is no longer the current one."""
