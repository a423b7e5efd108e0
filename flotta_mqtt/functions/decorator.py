"""`@distributed`: a function whose calls run on workers and return handles at once.

```python
@distributed(platform="*", threads=1)
def sleep_sum(a: int, b: int) -> int:
    sleep(1)
    return a + b

responses = [sleep_sum(x, x + 1) for x in range(10000)]
print([r.unwrap() for r in responses])
```

Decorate functions, not methods: a call carries its arguments, not an instance.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, ParamSpec, TypeVar, overload

from flotta_mqtt.functions import session as sessions
from flotta_mqtt.functions.calls import FunctionRef
from flotta_mqtt.functions.handles import CallHandle

P = ParamSpec("P")
R = TypeVar("R")


def selector(platform: str | Mapping[str, str] | None) -> dict[str, str]:
    """The worker labels a call needs: "*" any, "linux" → platform=linux, "k=v,k2=v2" as said.

    Every call also needs `allow_code=yes`, which a worker's agent sets from its config;
    the python executor is offered only there anyway, and the label makes a binding
    error name the reason.
    """
    labels: dict[str, str] = {}
    if isinstance(platform, Mapping):
        labels = {str(k): str(v) for k, v in platform.items()}
    elif platform and platform.strip() not in ("*", ""):
        for part in platform.split(","):
            key, sep, value = part.strip().partition("=")
            if sep:
                labels[key.strip()] = value.strip()
            else:
                labels["platform"] = key
    return {**labels, "allow_code": "yes"}


class DistributedFunction(Generic[P, R]):
    """A function whose calls are submitted to workers; see `distributed`.

    How it reaches a worker: a module-level function of an importable module (one of the
    workspace's, or an installed package's) is named by module and qualified name and
    imported there from the shipped workspace; a function defined in the main script (or
    inside another function) is pickled by value with cloudpickle, once per session.
    """

    def __init__(
        self,
        func: Callable[P, R],
        platform: str | Mapping[str, str] | None = "*",
        threads: int = 1,
        timeout: float | None = None,
        retries: int = 0,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if not 0 <= retries <= 100:
            raise ValueError(f"retries must be between 0 and 100, got {retries}")
        functools.update_wrapper(self, func)
        self.func = func
        self.platform = platform
        self.selector = selector(platform)
        self.threads = threads
        self.timeout = timeout
        self.retries = retries
        self.name = f"{func.__module__}.{func.__qualname__}"

    @property
    def __flotta_local__(self) -> Callable[P, R]:
        """What a worker runs for a call: the undecorated function."""
        return self.func

    @property
    def importable(self) -> bool:
        """Whether a worker can import it by name (else it is pickled by value)."""
        return self.func.__module__ != "__main__" and "<locals>" not in self.func.__qualname__

    def reference(self) -> FunctionRef:
        return FunctionRef(module=self.func.__module__, qualname=self.func.__qualname__)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> CallHandle[R]:
        """Submit a call (batched with its neighbours) and return its handle at once."""
        return sessions.current(self.name).call(self, args, kwargs)

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here, now, as if it were not decorated."""
        return self.func(*args, **kwargs)

    def map(self, *iterables: Iterable[Any]) -> list[CallHandle[R]]:
        """One call per item (or per tuple of items of several iterables), like `map`."""
        return [self(*args) for args in zip(*iterables, strict=True)]  # type: ignore[call-arg]

    def __repr__(self) -> str:
        return (
            f"<distributed function {self.name} platform={self.platform!r} threads={self.threads}>"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled by name when importable (the worker imports it), else by value."""
        if self.importable:
            return _by_name, (self.func.__module__, self.func.__qualname__)
        return DistributedFunction, (
            self.func,
            self.platform,
            self.threads,
            self.timeout,
            self.retries,
        )


def _by_name(module: str, qualname: str) -> Any:
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


@overload
def distributed(func: Callable[P, R], /) -> DistributedFunction[P, R]: ...


@overload
def distributed(
    *,
    platform: str | Mapping[str, str] | None = "*",
    threads: int = 1,
    timeout: float | None = None,
    retries: int = 0,
) -> Callable[[Callable[P, R]], DistributedFunction[P, R]]: ...


def distributed(
    func: Callable[P, R] | None = None,
    /,
    *,
    platform: str | Mapping[str, str] | None = "*",
    threads: int = 1,
    timeout: float | None = None,
    retries: int = 0,
) -> DistributedFunction[P, R] | Callable[[Callable[P, R]], DistributedFunction[P, R]]:
    """Make a function's calls run on workers; each call returns a `CallHandle` at once.

    - `platform`: which workers may run it, matched against the labels in their presence
      (their config's `labels`): "*" any worker; "linux" a worker labelled
      `platform: linux`; "os=linux,gpu=yes" or a mapping, every label given.
      Only workers with `allow_code: true` run calls in any case.
    - `threads`: how many calls of this function one worker runs at once (the worker's
      `max_jobs` caps it).
    - `timeout`: seconds one attempt may take on its worker, counted from when the worker
      starts it; the call's process is killed past it. None: no limit.
    - `retries`: further attempts after an attempt fails to produce an outcome (killed,
      timed out, its process died). An exception the function raises is an outcome and
      is never retried; a worker lost mid-call moves the call elsewhere regardless
      (bounded by the scheduler's `max_lost_attempts`).
    """

    def wrap(function: Callable[P, R]) -> DistributedFunction[P, R]:
        return DistributedFunction(function, platform, threads, timeout, retries)

    return wrap if func is None else wrap(func)
