"""Distributions: the rules that draw locks between the jobs of two consecutive steps."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from flotta_mqtt.model.errors import BindingError


class Arity(StrEnum):
    """How many jobs a step has at its entry or exit, known before any context is given."""

    ONE = "one"  # a single job on the initiator
    MANY = "many"  # one job per worker


Lock = tuple[int, int]  # (job that must complete, job it unlocks)


class _Distribution(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def check(self, exit_arity: Arity, entry_arity: Arity) -> str | None:
        """Why this distribution cannot join these arities, or None when it can."""
        raise NotImplementedError

    def locks(self, exits: list[int], entries: list[int]) -> list[Lock]:
        raise NotImplementedError


class Collect(_Distribution):
    """All jobs of a step → the single job of the next step (e.g. an aggregation)."""

    kind: Literal["collect"] = "collect"

    def check(self, exit_arity: Arity, entry_arity: Arity) -> str | None:
        if entry_arity is not Arity.ONE:
            return "Collect needs exactly one job in the next step"
        return None

    def locks(self, exits: list[int], entries: list[int]) -> list[Lock]:
        if len(entries) != 1:
            raise BindingError(f"Collect needs exactly one next job, got {len(entries)}")
        return [(job, entries[0]) for job in exits]


class Distribute(_Distribution):
    """The single job of a step → every job of the next step (e.g. send a model out)."""

    kind: Literal["distribute"] = "distribute"

    def check(self, exit_arity: Arity, entry_arity: Arity) -> str | None:
        if exit_arity is not Arity.ONE:
            return "Distribute needs exactly one job in its own step"
        return None

    def locks(self, exits: list[int], entries: list[int]) -> list[Lock]:
        if len(exits) != 1:
            raise BindingError(f"Distribute needs exactly one job, got {len(exits)}")
        return [(exits[0], job) for job in entries]


class Pairwise(_Distribution):
    """Job i → job i of the next step: each worker hands its product to its own next job."""

    kind: Literal["pairwise"] = "pairwise"

    def check(self, exit_arity: Arity, entry_arity: Arity) -> str | None:
        if exit_arity is not entry_arity:
            return "Pairwise needs as many jobs in the next step as in its own"
        return None

    def locks(self, exits: list[int], entries: list[int]) -> list[Lock]:
        _same_length("Pairwise", exits, entries)
        return list(zip(exits, entries, strict=True))


class RoundRobin(_Distribution):
    """Job i → job (i + 1) mod n of the next step: products travel one place round a ring."""

    kind: Literal["round_robin"] = "round_robin"

    def check(self, exit_arity: Arity, entry_arity: Arity) -> str | None:
        if exit_arity is not entry_arity:
            return "RoundRobin needs as many jobs in the next step as in its own"
        return None

    def locks(self, exits: list[int], entries: list[int]) -> list[Lock]:
        _same_length("RoundRobin", exits, entries)
        n = len(exits)
        return [(exits[i], entries[(i + 1) % n]) for i in range(n)]


def _same_length(name: str, exits: list[int], entries: list[int]) -> None:
    if len(exits) != len(entries):
        raise BindingError(
            f"{name} needs as many next jobs as jobs, got {len(exits)} → {len(entries)}"
        )


Distribution = Annotated[Collect | Distribute | Pairwise | RoundRobin, Field(discriminator="kind")]
