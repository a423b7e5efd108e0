"""A mergeable quantile sketch with a worst-case rank-error bound (`error_bound`).

Workers' sketches merge in any order or grouping; like min and max, a sketch carries
some of the data's own values to the initiator. So that it cannot carry a whole column,
k is at most MAX_K and a worker shrinks its sketch to k <= n / SHARE before it leaves:
about n / 8 of its n values (at most k per level).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

DEFAULT_K = 2048
MAX_K = 4096
SHARE = 16  # a worker's sketch has k <= n / SHARE


def site_k(n: int, k: int) -> int:
    """The k a worker's sketch of n values leaves with."""
    return max(1, min(k, n // SHARE))


def shrink(sketch: dict[str, Any]) -> dict[str, Any]:
    """A worker's sketch compacted to `site_k`, as it may leave the worker."""
    k = site_k(sketch["n"], sketch["k"])
    levels = [np.asarray(items, dtype=np.float64) for items in sketch["levels"]]
    return {"k": k, "n": sketch["n"], "levels": _compact(k, sketch["n"], levels)}


def empty(k: int) -> dict[str, Any]:
    return {"k": k, "n": 0, "levels": [[]]}


def error_bound(n: int, k: int) -> float:
    """eps: the worst-case rank error, as a fraction of the n values, whatever the coins.

    For the value v returned for quantile q of N values:

        #values < v  <=  q*N + eps*N   and   #values <= v  >=  q*N - eps*N,
        eps = ceil(log2(N / k)) / k     (0, i.e. exact, while N <= k)

    A compaction at level h changes the estimated rank of any value by at most 2**h; a
    level compacts only while it holds more than k items (weight > k * 2**h of the N
    values), so it compacts at most N / (k * 2**h) times, adding at most N / k; and only
    levels h < log2(N / k) ever compact. The coins make errors cancel, so typical errors
    are far smaller.
    """
    return 0.0 if n <= k else math.ceil(math.log2(n / k)) / k


def _coin(level: int, size: int, n: int) -> int:
    digest = hashlib.blake2b(f"{level}/{size}/{n}".encode(), digest_size=1).digest()
    return digest[0] & 1


def _compact(k: int, n: int, levels: list[np.ndarray]) -> list[list[float]]:
    """A hierarchy of compactors (Manku-Rajagopalan-Lindsay; the idea KLL refines).

    Level h holds items of weight 2**h, at most k of them once compacted. A level with
    more than k items is sorted and every other item (odd or even positions, by a coin: a
    hash of the level and sizes, so results are reproducible) moves up a level with twice
    the weight; an odd one out stays. Merging concatenates levels and compacts again.
    """
    level = 0
    while level < len(levels):
        items = levels[level]
        if len(items) > k:
            items = np.sort(items)
            even = len(items) - len(items) % 2
            promoted = items[_coin(level, len(items), n) : even : 2]
            levels[level] = items[even:]
            if level + 1 == len(levels):
                levels.append(np.empty(0))
            levels[level + 1] = np.concatenate([levels[level + 1], promoted])
        level += 1
    return [items.tolist() for items in levels]


def update(sketch: dict[str, Any], values: np.ndarray) -> dict[str, Any]:
    """The sketch with `values` (float64, no missing values) added."""
    levels = [np.asarray(items, dtype=np.float64) for items in sketch["levels"]]
    levels[0] = np.concatenate([levels[0], values])
    n = sketch["n"] + len(values)
    return {"k": sketch["k"], "n": n, "levels": _compact(sketch["k"], n, levels)}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    def level(sketch: dict[str, Any], h: int) -> list[float]:
        return sketch["levels"][h] if h < len(sketch["levels"]) else []

    depth = max(len(a["levels"]), len(b["levels"]))
    levels = [np.asarray(level(a, h) + level(b, h), dtype=np.float64) for h in range(depth)]
    k, n = min(a["k"], b["k"]), a["n"] + b["n"]
    return {"k": k, "n": n, "levels": _compact(k, n, levels)}


def quantiles(sketch: dict[str, Any], qs: list[float]) -> list[float | None]:
    """The value at each quantile q in [0, 1]: the first whose estimated rank reaches q*N.

    On exact data (N <= k) this is numpy's `quantile(..., method="inverted_cdf")`.
    """
    if sketch["n"] == 0:
        return [None for _ in qs]
    values = np.concatenate([np.asarray(items, dtype=np.float64) for items in sketch["levels"]])
    weights = np.concatenate(
        [np.full(len(items), 2.0**h) for h, items in enumerate(sketch["levels"])]
    )
    order = np.argsort(values, kind="stable")
    values, ranks = values[order], np.cumsum(weights[order])
    result: list[float | None] = []
    for q in qs:
        index = int(np.searchsorted(ranks, q * sketch["n"], side="left"))
        result.append(float(values[min(index, len(values) - 1)]))
    return result
