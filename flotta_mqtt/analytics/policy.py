"""A site's privacy policy for one dataset: what it answers exactly, and its budget."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

Label = str | int | bool


def ordered(bounds: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    for column, (low, high) in bounds.items():
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise ValueError(f"bounds of {column} must be finite, the lower first")
    return bounds


class PrivacyPolicy(BaseModel):
    """A site's policy for one dataset (`privacy:` in its dataset spec).

    The default answers only with differential privacy, from a budget of epsilon 1 and
    delta 1e-6 that the dataset never gets back.
    """

    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(default=1.0, ge=0)  # the whole budget, spent job by job
    delta: float = Field(default=1e-6, ge=0, lt=1)
    exact: bool = False  # answer without noise when a job gives no epsilon
    release_extremes: bool = False  # min, max and quantile sketches: values of the data
    # Clipping bounds per numeric column, for noised sums and means (a query may narrow them).
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    # The values a label column may take: the classes a classifier names, whatever is present.
    labels: dict[str, list[Label]] = Field(default_factory=dict)

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, bounds: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        return ordered(bounds)

    def describe(self) -> dict[str, Any]:
        """What a worker announces of its policy: the rules, not what is left."""
        return {
            "exact": self.exact,
            "release_extremes": self.release_extremes,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "bounds": {c: list(b) for c, b in self.bounds.items()},
            "labels": self.labels,
        }
