"""Operations for testing the engine itself: `noop` (no work) and `trail` (the path taken)."""

from __future__ import annotations

from typing import Any, ClassVar

from flotta_mqtt.analytics.registry import JobContext, OperationDef, register


@register
class Noop(OperationDef):
    """Does nothing and produces nothing: measures the engine's own overhead."""

    name: ClassVar[str] = "noop"
    instant: ClassVar[bool] = True

    def initialize(self, params: Any, ctx: JobContext) -> None:
        return None

    def local(self, params: Any, ctx: JobContext) -> None:
        return None

    def aggregate(self, params: Any, ctx: JobContext) -> None:
        return None


@register
class Trail(OperationDef):
    """Appends each node's name to the trail it receives: shows the path products took."""

    name: ClassVar[str] = "trail"

    def _extend(self, ctx: JobContext) -> dict[str, Any]:
        trail: list[str] = []
        for product in ctx.inputs:
            trail += product["trail"]
        return {"trail": [*trail, ctx.node], "iteration": ctx.job.iteration}

    def initialize(self, params: Any, ctx: JobContext) -> dict[str, Any]:
        return self._extend(ctx)

    def local(self, params: Any, ctx: JobContext) -> dict[str, Any]:
        return self._extend(ctx)

    def aggregate(self, params: Any, ctx: JobContext) -> dict[str, Any]:
        return self._extend(ctx)
