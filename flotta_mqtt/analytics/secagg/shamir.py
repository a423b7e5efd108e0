"""Shamir secret sharing over the prime field of 2**521 - 1 (a Mersenne prime).

The field holds any 32-byte secret (X25519 keys, seeds) with room to spare. A secret is
the constant term of a random polynomial of degree threshold - 1; a share is its value at
x = 1, 2, …; any `threshold` shares give the secret back (Lagrange at 0), fewer say
nothing of it. Shares beyond the threshold are checked against the polynomial, so
shares that do not agree are an error, never a wrong secret.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

PRIME = 2**521 - 1
# Bytes per random coefficient: 64 bits more than the field, so reducing them modulo
# PRIME leaves a bias below 2**-64.
COEFFICIENT_BYTES = 74


class ShareError(ValueError):
    """Shares that cannot give a secret back: too few, or not on one polynomial."""


def coefficients(randomness: bytes, threshold: int) -> list[int]:
    """The threshold - 1 random coefficients of a polynomial, from uniform bytes."""
    need = (threshold - 1) * COEFFICIENT_BYTES
    if len(randomness) < need:
        raise ValueError(f"{need} random bytes needed, got {len(randomness)}")
    return [
        int.from_bytes(randomness[i * COEFFICIENT_BYTES : (i + 1) * COEFFICIENT_BYTES], "big")
        % PRIME
        for i in range(threshold - 1)
    ]


def split(secret: int, xs: Iterable[int], threshold: int, randomness: bytes) -> dict[int, int]:
    """The share of `secret` at each point x of `xs` (distinct, 1 <= x < PRIME)."""
    if not 0 <= secret < PRIME:
        raise ValueError("the secret is not an element of the field")
    if threshold < 1:
        raise ValueError(f"a threshold of {threshold} shares is below 1")
    points = list(xs)
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ValueError("share points must be distinct and in 1 … PRIME - 1")
    if len(points) < threshold:
        raise ValueError(f"{len(points)} shares can never reach a threshold of {threshold}")
    poly = [secret, *coefficients(randomness, threshold)]
    return {x: _evaluate(poly, x) for x in points}


def combine(shares: Mapping[int, int], threshold: int) -> int:
    """The secret under `shares` ({x: y}); ShareError if fewer than `threshold` or if the
    shares beyond the first `threshold` are not on the same polynomial."""
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares, fewer than the threshold of {threshold}")
    points = sorted(shares.items())
    base = points[:threshold]
    for x, y in points[threshold:]:
        if _interpolate(base, x) != y % PRIME:
            raise ShareError(f"the share at x = {x} is not on the polynomial of the others")
    return _interpolate(base, 0)


def _evaluate(poly: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(poly):  # Horner
        result = (result * x + coefficient) % PRIME
    return result


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """The value at `at` of the polynomial of degree < len(points) through `points`."""
    result = 0
    for j, (xj, yj) in enumerate(points):
        top, bottom = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                top = top * (at - xm) % PRIME
                bottom = bottom * (xj - xm) % PRIME
        result = (result + yj * top * pow(bottom, -1, PRIME)) % PRIME
    return result
