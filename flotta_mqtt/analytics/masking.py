"""Masked sequential aggregation: no worker learns the running total it is handed, and
nobody else sees it at all.

In a `Sequential` step the initialize job starts the running value at a random mask, each
worker adds its contribution modulo 2**BITS, and the aggregate job takes the mask off.
Every hop seals the running value to the next (an ephemeral X25519 key against the key the
next worker advertised in the step's first round, then AES-256-GCM), the last worker to the
initiator: the store, the statuses and the logs hold ciphertexts only, and the mask never
leaves the initiator's memory.

What it protects: each worker is handed a uniformly random number, whatever the workers
before it contributed; a reader of the store or the bus learns nothing of any value. What
it does not: the initiator learns the total (the result); a worker's two neighbours,
colluding, learn its contribution; who takes part, in which order, is visible to all.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from flotta_mqtt.analytics.registry import JobContext, OperationError
from flotta_mqtt.analytics.secagg.crypto import (
    VAULT,
    SealError,
    agree,
    new_private_key,
    public_key,
    seal,
    unseal,
)
from flotta_mqtt.analytics.secagg.site import SiteSecrets, round_id
from flotta_mqtt.model.errors import describe
from flotta_mqtt.protocol.secagg import MaskedRunning, Sealed, SecAggKeys

BITS = 2176
MODULUS = 1 << BITS
SCALE_BITS = 1074  # 2**-1074 is float64's smallest step


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


def _masks(ctx: JobContext, count: int) -> list[int]:
    """The step's `count` masks, derived again by the aggregate job on the same node."""
    round_ = round_id(ctx.job)
    size = BITS // 8
    return [
        int.from_bytes(VAULT.secret("sequential mask", round_, ctx.node, str(i), size=size), "big")
        for i in range(count)
    ]


def _inputs(
    ctx: JobContext, others: bool = False
) -> tuple[MaskedRunning | None, SecAggKeys | None]:
    """The running value handed to this job, and the keys of its next hop, if any; any
    other input is an error, unless `others` (the start of an Iterate's later round is
    also handed the round before's result, which it ignores)."""
    running: MaskedRunning | None = None
    keys: SecAggKeys | None = None
    try:
        for product in ctx.inputs:
            kind = product.get("type") if isinstance(product, dict) else None
            if kind == "masked_running" and running is None:
                running = MaskedRunning.model_validate(product)
            elif kind == "secagg_keys" and keys is None:
                keys = SecAggKeys.model_validate(product)
            elif not others:
                raise OperationError(
                    f"{ctx.node}: masked aggregation runs in a Sequential step, whose jobs are "
                    "handed one sealed running value and their next hop's keys; this job "
                    "received something else"
                )
    except ValidationError as exc:
        raise OperationError(f"{ctx.node}: {describe(exc, 'input')}") from None
    for message in (running, keys):
        if message is not None and message.round != round_id(ctx.job):
            raise OperationError(f"{ctx.node}: an input of another step or round")
    return running, keys


def _seal(values: list[int], round_: str, to: str, reply: str) -> dict[str, Any]:
    ephemeral = new_private_key()
    key = agree(ephemeral, to, "running value", round_, to)
    plain = json.dumps([format(v, "x") for v in values]).encode()
    nonce, ciphertext = seal(key, plain, f"{round_}|{to}")
    return MaskedRunning(
        round=round_,
        ephemeral_key=public_key(ephemeral),
        reply_key=reply,
        sealed=Sealed(nonce=nonce, ciphertext=ciphertext),
    ).model_dump()


def _open(running: MaskedRunning | None, ctx: JobContext, count: int) -> list[int]:
    if running is None:
        raise OperationError(
            f"{ctx.node}: masked aggregation runs in a Sequential step, whose first job hands "
            "each worker a masked running value; this job received none"
        )
    mine = SiteSecrets.of(running.round, ctx.node)
    key = agree(mine.cipher, running.ephemeral_key, "running value", running.round, mine.cipher_key)
    try:
        plain = unseal(
            key,
            running.sealed.nonce,
            running.sealed.ciphertext,
            f"{running.round}|{mine.cipher_key}",
        )
    except SealError:
        raise OperationError(
            f"{ctx.node}: the running value handed to it does not open with its keys: the node "
            "restarted since the step began (its keys live only in its memory); submit the "
            "artifact again"
        ) from None
    values = [int(v, 16) for v in json.loads(plain)]
    if len(values) != count or any(not 0 <= v < MODULUS for v in values):
        raise OperationError(f"{ctx.node}: the masked running value holds {len(values)} numbers")
    return values


def start(ctx: JobContext, count: int) -> dict[str, Any]:
    """The initialize job's product: the running value set to the step's masks, sealed to
    the first worker."""
    _, keys = _inputs(ctx, others=True)
    if keys is None:
        raise OperationError(
            f"{ctx.node}: a masked Sequential starts once its first worker advertised its keys; "
            "this job received none"
        )
    reply = SiteSecrets.of(keys.round, ctx.node).cipher_key
    return _seal(_masks(ctx, count), keys.round, keys.cipher_key, reply)


def add(ctx: JobContext, contribution: list[int]) -> dict[str, Any]:
    """A worker's part: its contribution added to the running value it was handed, sealed
    to the next worker (or, from the last, to the initiator)."""
    running, keys = _inputs(ctx)
    values = _open(running, ctx, len(contribution))
    assert running is not None
    total = [(a + b) % MODULUS for a, b in zip(values, contribution, strict=True)]
    to = keys.cipher_key if keys is not None else running.reply_key
    return _seal(total, running.round, to, running.reply_key)


def remove(ctx: JobContext, count: int) -> list[int]:
    """The aggregate's part: the masks taken off, as signed integers."""
    running, _ = _inputs(ctx)
    values = _open(running, ctx, count)
    plain = [(v - m) % MODULUS for v, m in zip(values, _masks(ctx, count), strict=True)]
    return [v - MODULUS if v >= MODULUS // 2 else v for v in plain]
