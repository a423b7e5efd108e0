"""Which operations a secure aggregation can sum, and how.

A site's part becomes a list of integers of the masking ring (analytics/masking.py:
fixed point with 2**-1074 as its unit in Z/2**2176, so every float64 is exact and up to
2**64 parts of any size never wrap); the unmasked sum becomes what the operation's
Finalize takes. The sum is exact, and rounded to a float once, when it is decoded.

- count, sum, mean (any `Maskable` estimator): the estimator's own state, summed.
- linear and logistic regression (federated averaging): each site's coefficients times
  its training rows, and its rows; the sum gives the average weighted by rows. The
  metrics of the model received are not released under secure aggregation.
"""

from __future__ import annotations

from typing import Any

from flotta_mqtt.analytics import masking
from flotta_mqtt.analytics.estimators import Maskable
from flotta_mqtt.analytics.linear import LinearModel
from flotta_mqtt.analytics.registry import JobContext, OperationDef, OperationError


def reason(definition: OperationDef) -> str | None:
    """Why an operation cannot be summed securely, or None when it can."""
    if isinstance(definition, Maskable | LinearModel):
        return None
    return (
        f"operation {definition.name!r} cannot run under secure aggregation: its merge is not "
        "a sum (count, sum, mean, linear_regression and logistic_regression can)"
    )


def size(definition: OperationDef, params: Any) -> int:
    """How many integers each site contributes."""
    if isinstance(definition, Maskable):
        return len(definition.to_ints(definition.empty(params)))
    return len(params.features) + 2  # intercept, coefficients, rows


def summand(definition: OperationDef, params: Any, ctx: JobContext) -> list[int]:
    """This site's part of the sum, as signed integers."""
    if isinstance(definition, Maskable):
        # What the site's policy lets leave it: exact, or noised and paid for.
        return definition.to_ints(definition.own(params, ctx))
    if not params.train:
        raise OperationError(
            f"{definition.name} with train=false releases metrics only, which secure "
            "aggregation does not sum: run the evaluation round without `secure`"
        )
    product = definition.local(params, ctx)
    n, model = product["n"], product["model"]
    return [masking.fixed(n * v) for v in (model["intercept"], *model["coef"])] + [n]


def total(definition: OperationDef, params: Any, ints: list[int]) -> Any:
    """The sum as the operation's Finalize takes it: a merged state, or a local product."""
    if isinstance(definition, Maskable):
        return definition.from_ints(ints)
    n = ints[-1]
    if n <= 0:
        raise OperationError(f"{definition.name}: the secure sum holds no training rows")
    theta = [masking.unfixed(v) / n for v in ints[:-1]]
    return {"model": {"intercept": theta[0], "coef": theta[1:]}, "n": n, "metrics": None}
