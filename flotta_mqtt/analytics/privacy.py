"""Disclosure control: a site's privacy policy, the noise its worker adds, and its budget.

A site sets, per dataset, a privacy budget (epsilon, delta) and whether it answers
exactly at all (`exact`) or releases order statistics (`release_extremes`). An analyst
asks for a noised answer with `epsilon` (and `delta` > 0 for Gaussian noise) in a step's
params; the worker spends that much of its budget, recorded in its journal before the
answer leaves, and refuses a job that would overspend. The noise is OpenDP's: its
samplers are exact (no floating-point attack on a naive Laplace sampler applies) and
draw from the operating system's randomness, so they cannot be seeded.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import opendp.combinators as dp_c
import opendp.measurements as dp_m
from opendp.domains import atom_domain, map_domain, vector_domain
from opendp.metrics import absolute_distance, l01inf_distance, l1_distance, l2_distance
from opendp.mod import binary_search_param, enable_features
from pydantic import BaseModel, Field, field_validator, model_validator

from flotta_mqtt.analytics.policy import ordered
from flotta_mqtt.analytics.registry import Budget, Dataset, PrivacyRefused

# opendp.prelude would import scikit-learn (a second at every start): its parts instead.
enable_features("contrib")


class Private(BaseModel):
    """What an analyst asks of the noise (every estimator's params include these)."""

    # None: an exact answer, where the site allows it. Otherwise the epsilon this job
    # spends of each site's budget.
    epsilon: float | None = Field(default=None, gt=0, le=100)
    delta: float = Field(default=0.0, ge=0, lt=1)  # > 0: Gaussian noise (and thresholds)
    # Clipping bounds per column for sums and means; else the site's declared bounds.
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, bounds: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        return ordered(bounds)

    @model_validator(mode="after")
    def _noise_asked(self) -> Private:
        if self.epsilon is None and (self.delta or self.bounds):
            raise ValueError("delta and bounds shape the noise: give epsilon too")
        return self


@dataclass(frozen=True)
class Noise:
    """One mechanism at one (epsilon, delta): Laplace when delta is 0, else Gaussian."""

    epsilon: float
    delta: float

    @property
    def mechanism(self) -> Literal["laplace", "gaussian"]:
        return "gaussian" if self.delta > 0 else "laplace"

    def split(self, parts: int) -> Noise:
        """The share of each of `parts` releases composed (basic composition)."""
        return Noise(self.epsilon / parts, self.delta / parts)

    def ints(self, values: list[int], l1: int, l2: float) -> list[int]:
        """Integer values (counts) with discrete noise, calibrated to what one row can
        change them by: `l1` in sum (Laplace), `l2` in Euclidean norm (Gaussian)."""
        if not values:
            return []
        measurement = self._measurement(True, l1, l2)
        return [int(v) for v in measurement([int(v) for v in values])]

    def floats(self, values: list[float], l1: float, l2: float) -> list[float]:
        if not values:
            return []
        measurement = self._measurement(False, l1, l2)
        return [float(v) for v in measurement([float(v) for v in values])]

    def scale(self, l1: float, l2: float, integers: bool = False) -> float:
        """The noise's scale: the smallest whose privacy map OpenDP proves within
        (epsilon, delta). Laplace: l1 / epsilon; Gaussian: its standard deviation."""
        make, d_in, d_out = self._family(integers, l1, l2)
        return float(binary_search_param(make, d_in=d_in, d_out=d_out))

    def _family(self, integers: bool, l1: float, l2: float) -> tuple[Any, Any, Any]:
        """OpenDP's measurement as a function of its scale, its input and output distances."""
        atom = "i64" if integers else "f64"
        domain = vector_domain(atom_domain(T=atom, nan=None if integers else False))
        if self.delta == 0:
            metric = l1_distance(T=atom)

            def laplace(scale: float) -> Any:
                return dp_m.make_laplace(domain, metric, scale=scale)

            return laplace, int(l1) if atom == "i64" else float(l1), self.epsilon

        def gaussian(scale: float) -> Any:
            measure = dp_m.make_gaussian(domain, l2_distance(T=float), scale=scale)
            return dp_c.make_fix_delta(dp_c.make_zCDP_to_approxDP(measure), self.delta)

        return gaussian, float(l2), (self.epsilon, self.delta)

    def _measurement(self, integers: bool, l1: float, l2: float) -> Any:
        make, d_in, d_out = self._family(integers, l1, l2)
        return make(binary_search_param(make, d_in=d_in, d_out=d_out))


def requested(params: Any) -> Noise | None:
    """The noise a job's params ask for; None for an exact answer."""
    epsilon = getattr(params, "epsilon", None)
    return None if epsilon is None else Noise(epsilon, getattr(params, "delta", 0.0))


def require_exact(data: Dataset, operation: str) -> None:
    if not data.privacy.exact:
        raise PrivacyRefused(
            f"worker {data.node}: project {data.project} gives no exact {operation} (its "
            "policy has exact: false): ask a noised answer with epsilon, where it has one"
        )


def require_extremes(data: Dataset, operation: str) -> None:
    if not data.privacy.release_extremes:
        raise PrivacyRefused(
            f"worker {data.node}: project {data.project} does not release {operation}: its "
            "values are records of the data (the site's policy has release_extremes: false)"
        )


def charge(data: Dataset, budget: Budget, noise: Noise) -> None:
    """Spend a job's noise from the dataset's budget, or refuse it with the reason."""
    budget.spend(data.project, noise.epsilon, noise.delta, data.privacy)


def bounds(params: Any, data: Dataset, column: str) -> tuple[float, float]:
    """The clipping bounds of a column: the query's, else the site's, else refused."""
    found = params.bounds.get(column) or data.privacy.bounds.get(column)
    if found is None:
        raise PrivacyRefused(
            f"worker {data.node}: a noised sum of column {column} of project {data.project} "
            f"needs clipping bounds: give bounds: {{{column}: [low, high]}} (the site "
            "declares none)"
        )
    return found


def clip(numbers: np.ndarray, limits: tuple[float, float] | None) -> np.ndarray:
    return numbers if limits is None else np.clip(numbers, limits[0], limits[1])


def sensitivity(limits: tuple[float, float]) -> float:
    """What adding or removing one row can change a clipped sum by."""
    return max(abs(limits[0]), abs(limits[1]))


def threshold_counts(counts: dict[str, int], noise: Noise, min_group_size: int) -> dict[str, int]:
    """Noised group counts, keeping only groups whose noisy count passes a threshold.

    OpenDP's Laplace threshold mechanism (Rogers 2023): which groups exist is itself
    released with (epsilon, delta), so a group of one row shows with probability at most
    delta. The threshold is at least the site's minimum group size.
    """
    if noise.delta <= 0:
        raise PrivacyRefused(
            "noised group statistics release only the groups whose noisy count passes a "
            "threshold, which needs delta > 0 (e.g. 1e-7), unless the site declares the "
            "categories of every grouping column"
        )
    threshold = max(_lowest_threshold(noise.epsilon, noise.delta), min_group_size)
    kept = _threshold_mechanism(noise.epsilon, threshold)({k: int(v) for k, v in counts.items()})
    return {key: int(value) for key, value in kept.items()}


def public_counts(counts: dict[str, int], epsilon: float) -> dict[str, int]:
    """Noised counts of groups whose keys are public (every combination of declared
    categories, whatever the data holds): each gets Laplace noise and none is dropped, so
    no threshold and no delta are needed. A row is in one group: it changes one count by
    1. A negative noisy count reads as 0 (post-processing costs no privacy)."""
    names = sorted(counts)
    noisy = Noise(epsilon, 0.0).ints([counts[name] for name in names], 1, 1)
    return {name: max(0, value) for name, value in zip(names, noisy, strict=True)}


def _threshold_mechanism(epsilon: float, threshold: int, scale: float | None = None) -> Any:
    domain = map_domain(atom_domain(T=str), atom_domain(T="i64"))
    metric = l01inf_distance(absolute_distance(T="i64"))
    scale = _threshold_scale(epsilon) if scale is None else scale
    return dp_m.make_laplace_threshold(domain, metric, scale=scale, threshold=threshold)


@functools.lru_cache(maxsize=256)
def _threshold_scale(epsilon: float) -> float:
    """The smallest scale from 1 / epsilon up whose epsilon OpenDP's map finds within
    `epsilon`: its rounding makes 1 / (1 / epsilon) exceed epsilon for some (1/56, 1/3),
    and then no threshold is private and every noised group statistic failed."""
    scale = 1.0 / epsilon
    while _threshold_mechanism(epsilon, 2**30, scale).map((1, 1, 1))[0] > epsilon:
        scale = math.nextafter(scale, math.inf)
    return scale


@functools.lru_cache(maxsize=256)
def _lowest_threshold(epsilon: float, delta: float) -> int:
    """The lowest threshold at which the mechanism is (epsilon, delta)-private: a search
    of about a quarter of a second, the same for every job asking the same."""

    def make(threshold: float) -> Any:
        return _threshold_mechanism(epsilon, int(threshold))

    return int(binary_search_param(make, d_in=(1, 1, 1), d_out=(epsilon, delta), T=int))


def released(value: Any, params: Any, mechanism: str | None = None) -> Any:
    """A finalized value as released: exact as it is, noised with what made it."""
    noise = requested(params)
    if noise is None:
        return value
    return {
        "value": value,
        "mechanism": mechanism or noise.mechanism,
        "epsilon": noise.epsilon,
        "delta": noise.delta,
    }
