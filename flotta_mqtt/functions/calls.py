"""What a call is on the wire: the task parameters, the pickled arguments, the sealed outcome.

Small pickled arguments travel inline in the task's parameters (base64), larger ones as a
stored file named with its sha256 in the parameters; the outcome is a job file written by
the worker, announced with its sha256 in the call's product. Both sides must trust each
other, as with any pickle-based RPC (see `dumps`), and each unpickles only bytes it has
verified against a sha256 that came over the bus: never what someone put in the store.
"""

from __future__ import annotations

import hashlib
import pickle
import traceback
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flotta_mqtt.protocol.messages import Resource

# Pickled arguments up to this many base64 characters ride in the task; beyond, a job file.
INLINE_LIMIT = 64 * 1024
_MAGIC = b"flotta-call-outcome/1\n"


def result_file(task: str | None) -> str:
    """The job file the outcome of the call that is task `task` is written to."""
    return f"results/{task}"


class FunctionRef(BaseModel):
    """A function the worker imports: a module of the workspace (or installed) and a name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    module: str
    qualname: str


class CallParams(BaseModel):
    """The parameters of a `python` task: one call of one function."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # module.qualname, for logs and messages
    workspace: Resource  # the archive, named by its sha256
    function: FunctionRef | None = None  # imported by the worker...
    pickled: Resource | None = None  # ...or pickled by value (defined in `__main__`)
    call: str | None = None  # base64 of the pickled (args, kwargs)...
    call_file: Resource | None = None  # ...or the stored file holding them
    result_file: str  # the job file the outcome is written to
    threads: int = Field(default=1, ge=1, le=1024)  # calls of this function at once per worker
    timeout: float | None = Field(default=None, gt=0)


class Outcome(BaseModel):
    """What a call produced: a pickled value, or a raised exception described three ways.

    The exception is pickled when it survives a round trip on the worker, and always
    described as text, so the caller can re-raise it as itself or, failing that, as a
    RemoteError with the same type name, message and traceback.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["value", "raised"]
    value: bytes = b""  # cloudpickle of the return value
    exception: bytes | None = None  # cloudpickle of the exception, when it round-trips
    type: str = ""  # qualified name of the exception's class
    message: str = ""
    traceback: str = ""
    worker: str = ""


def seal(outcome: Outcome) -> bytes:
    """The outcome as bytes that carry their own sha256.

    A reader can then tell a complete outcome from a damaged one, even if a stale attempt
    of the same call replaced the file.
    """
    body = pickle.dumps(outcome.model_dump(), protocol=pickle.HIGHEST_PROTOCOL)
    return _MAGIC + hashlib.sha256(body).digest() + body


def unseal(data: bytes) -> Outcome:
    """The outcome in sealed bytes; ValueError if they are not a complete one."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a call outcome")
    digest, body = data[len(_MAGIC) : len(_MAGIC) + 32], data[len(_MAGIC) + 32 :]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("a damaged call outcome (its sha256 does not match)")
    return Outcome.model_validate(pickle.loads(body))


def raised(exc: BaseException, worker: str) -> Outcome:
    """Describe an exception raised by a call, pickling it if it can be unpickled again."""
    import cloudpickle

    kind = type(exc)
    text = "".join(traceback.format_exception(exc))
    pickled: bytes | None
    try:
        pickled = cloudpickle.dumps(exc)
        pickle.loads(pickled)  # an exception whose __init__ wants other arguments fails here
    except Exception:
        pickled = None
    return Outcome(
        kind="raised",
        exception=pickled,
        type=f"{kind.__module__}.{kind.__qualname__}",
        message=str(exc),
        traceback=text,
        worker=worker,
    )


def dumps(value: Any) -> bytes:
    """`value` pickled with cloudpickle: lambdas, closures and what `__main__` defines by value.

    So the caller's script needs no importable module of its own; what is importable (the
    workspace's modules, installed packages) is still pickled by reference, as `pickle`
    does. A worker unpickles what the caller sends and the caller what the worker returns.
    """
    import cloudpickle

    data: bytes = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return data
