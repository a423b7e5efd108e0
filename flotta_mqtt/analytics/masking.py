"""Masked sequential aggregation: no worker learns the running total it is handed.

In a `Sequential` step the initialize job starts the running value at a random mask, each
worker adds its contribution modulo 2**BITS, and the aggregate job takes the mask off.
What it protects: each worker is handed a uniformly random number, whatever the workers
before it contributed. What it does not: the initiator learns the total (the result); a
worker's two neighbours, colluding, learn its contribution; who takes part, in which order,
is visible to all.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from flotta_mqtt.analytics.registry import OperationError
from flotta_mqtt.protocol import JobReady

BITS = 2176
MODULUS = 1 << BITS
SCALE_BITS = 1074  # 2**-1074 is float64's smallest step


class MaskVault:
    """The initiator's secret: masks derived per (artifact, step, round), never stored.

    Both initiator jobs of a step run on the same initiator node, which derives the masks
    from a key drawn when its process starts and kept only in its memory: a mask never
    travels, and the artifact's seed (which workers see) plays no part. If that process
    restarts between the step's first and last jobs, the last fails with a clear error and
    the artifact must be submitted again.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self.id = secrets.token_hex(8)  # tells a running value from another process's

    def masks(self, job: JobReady, count: int) -> list[int]:
        """`count` independent uniform masks for this job's step (HKDF-Expand, RFC 5869)."""
        size = BITS // 8
        result = []
        for index in range(count):
            info = f"{job.artifact_id}/{job.step}/{job.iteration}/{index}".encode()
            stream, block, counter = b"", b"", 1
            while len(stream) < size:
                block = hmac.digest(self._key, block + info + bytes([counter]), hashlib.sha256)
                stream += block
                counter += 1
            result.append(int.from_bytes(stream[:size], "big"))
        return result


VAULT = MaskVault()


def fixed(value: float) -> int:
    """A float as an exact integer count of 2**-1074.

    Every finite float64 is a whole multiple of 2**-1074, and 2**BITS leaves room for 2**64
    of the largest, so taking the mask off loses nothing: the result is the exact sum of
    the workers' contributions, rounded once.
    """
    numerator, denominator = float(value).as_integer_ratio()
    return numerator * ((1 << SCALE_BITS) // denominator)


def unfixed(value: int) -> float:
    try:
        return value / (1 << SCALE_BITS)  # int / int rounds correctly, once
    except OverflowError:
        raise OperationError("the masked sum is beyond the range of a float") from None


def start(job: JobReady, count: int) -> dict[str, Any]:
    """The initialize job's product: the running value set to the step's masks."""
    return {"vault": VAULT.id, "masked": [format(m, "x") for m in VAULT.masks(job, count)]}


def _values(running: Any, node: str, count: int) -> list[int]:
    if not (isinstance(running, dict) and isinstance(running.get("masked"), list)):
        raise OperationError(
            f"{node}: masked aggregation runs in a Sequential step, whose first job hands "
            "each worker a masked running value; this job received none"
        )
    values = [int(v, 16) for v in running["masked"]]
    if len(values) != count:
        raise OperationError(f"{node}: the masked running value holds {len(values)} numbers")
    return values


def add(running: Any, contribution: list[int], node: str) -> dict[str, Any]:
    """A worker's part: its contribution added to the running value it was handed."""
    values = _values(running, node, len(contribution))
    total = [(a + b) % MODULUS for a, b in zip(values, contribution, strict=True)]
    return {"vault": running["vault"], "masked": [format(v, "x") for v in total]}


def remove(running: Any, job: JobReady, count: int, node: str) -> list[int]:
    """The aggregate's part: the masks taken off, as signed integers."""
    values = _values(running, node, count)
    if running.get("vault") != VAULT.id:
        raise OperationError(
            f"{node}: the masks of this step were drawn by an initiator process that has "
            "since restarted; submit the artifact again"
        )
    plain = [(v - m) % MODULUS for v, m in zip(values, VAULT.masks(job, count), strict=True)]
    return [v - MODULUS if v >= MODULUS // 2 else v for v in plain]
