"""The rounds of a secure aggregation, as the operations its jobs run (model.SecureRound).

A secure `Parallel` binds to one job per site and round, then one on the initiator;
each consumes the products of every earlier round, so it sees who is still in:

1. keys    every site advertises two X25519 public keys (U1: the sites that did).
2. share   each site deals Shamir shares of its self-mask seed b and of its mask key s,
           `threshold` of them needed, one sealed to each site of its neighbourhood in U1
           (U2: dealers).
3. mask    each site of U2 sends y = x + PRG(b) + Σ ±PRG(s_uv) over its neighbours v in
           U2, the pairwise masks cancelling in the sum (U3: the sites that did).
4. reveal  each site of U3 opens the shares dealt to it and reveals, for each dealer, the
           share of b if the dealer is in U3, else the share of s (U4: revealers).
5. unmask  the initiator adds up y over U3, takes off each PRG(b) and, for each dealer that
           dropped out before its masked input, its pairwise masks with its neighbours in U3.

A neighbourhood is every site (SecAgg, Bonawitz et al. 2017) or, with `neighbours`, a
site and its neighbours in SecAgg+'s sparse graph (Bell et al. 2020; site.neighbourhoods).

The sum covers exactly the sites of U3: those whose masked input was in before the round
closed, including any that dropped out later. Every site refuses to go on, and the
initiator to unmask, with fewer than `threshold` sites of a neighbourhood in, and the
threshold must be a majority of one: no one can then be handed both shares of one site.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from flotta_mqtt.analytics import masking
from flotta_mqtt.analytics.registry import (
    JobContext,
    OperationDef,
    OperationError,
    lookup,
    register,
)
from flotta_mqtt.analytics.secagg import shamir, summable
from flotta_mqtt.analytics.secagg.crypto import SealError, expand, public_key, seal, unseal
from flotta_mqtt.analytics.secagg.site import (
    SiteSecrets,
    neighbourhoods,
    pair_seed,
    round_id,
    sealing_key,
    sign,
)
from flotta_mqtt.model import Operation
from flotta_mqtt.model.errors import describe
from flotta_mqtt.model.steps import SecureRound, Threshold
from flotta_mqtt.protocol.secagg import (
    FieldElement,
    Sealed,
    SecAggKeys,
    SecAggMasked,
    SecAggProduct,
    SecAggReveal,
    SecAggShares,
    Share,
)

_PRODUCT: TypeAdapter[Any] = TypeAdapter(SecAggProduct)
SECRET_BYTES = 32


class RoundParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: Threshold | None = None
    neighbours: int | None = Field(default=None, ge=2)


class SummedParams(RoundParams):
    """The rounds that run the summed operation: its name and parameters, checked."""

    operation: Operation

    @model_validator(mode="after")
    def _summable(self) -> SummedParams:
        try:
            definition, _ = lookup(self.operation)
        except OperationError as exc:
            raise ValueError(str(exc)) from None
        why = summable.reason(definition)
        if why is not None:
            raise ValueError(why)
        return self


class _Dealt(BaseModel):
    """What a sealed share holds: the recipient's point and its shares of both seeds."""

    model_config = ConfigDict(extra="forbid")

    x: int = Field(ge=1)
    self_mask: FieldElement
    mask_key: FieldElement


@dataclass
class Round:
    """A job's view of its round: the products of the rounds before it, by site."""

    id: str
    node: str
    params: RoundParams
    keys: dict[str, SecAggKeys] = field(default_factory=dict)
    shares: dict[str, SecAggShares] = field(default_factory=dict)
    masked: dict[str, SecAggMasked] = field(default_factory=dict)
    reveals: dict[str, SecAggReveal] = field(default_factory=dict)
    others: list[Any] = field(default_factory=list)  # inputs of the summed operation
    _circles: dict[str, list[str]] | None = field(default=None, init=False, repr=False)

    @classmethod
    def of(cls, ctx: JobContext, params: RoundParams) -> Round:
        found = cls(round_id(ctx.job), ctx.node, params)
        for product in ctx.inputs:
            kind = product.get("type") if isinstance(product, dict) else None
            if not (isinstance(kind, str) and kind.startswith("secagg_")):
                found.others.append(product)
                continue
            try:
                message = _PRODUCT.validate_python(product)
            except ValidationError as exc:
                raise OperationError(f"{ctx.node}: {describe(exc, kind)}") from None
            if message.round != found.id:
                raise OperationError(f"{ctx.node}: a {kind} product of another round")
            table: dict[str, Any] = found.tables()[message.type]
            if message.site in table:
                raise OperationError(f"{ctx.node}: a second {kind} product from {message.site}")
            table[message.site] = message
        later = set(found.shares) | set(found.masked) | set(found.reveals)
        if not later <= set(found.keys):
            unknown = ", ".join(sorted(later - set(found.keys)))
            raise OperationError(
                f"{ctx.node}: products from sites that advertised no keys: {unknown}"
            )
        return found

    def tables(self) -> dict[str, dict[str, Any]]:
        """Each round's products by site, under its message type."""
        return {
            "secagg_keys": self.keys,
            "secagg_shares": self.shares,
            "secagg_masked": self.masked,
            "secagg_reveal": self.reveals,
        }

    def circle(self, site: str) -> list[str]:
        """`site` and its neighbours among the sites that advertised keys."""
        if self._circles is None:
            self._circles = neighbourhoods(self.id, list(self.keys), self.params.neighbours)
        return self._circles[site]

    def threshold(self) -> int:
        """How many of a neighbourhood (all sites, in SecAgg) must be in: a majority of it."""
        # Every neighbourhood is as large: the graph is regular.
        sites = len(self.circle(min(self.keys))) if self.keys else 0
        asked = self.params.threshold
        if asked is None:
            asked = sites // 2 + 1
        elif isinstance(asked, float):
            asked = math.ceil(asked * sites)
        threshold = max(2, asked)
        if threshold > sites:
            raise OperationError(
                f"secure aggregation needs {threshold} sites (its threshold), but a "
                f"neighbourhood holds {sites} of the sites that advertised keys: "
                f"{', '.join(sorted(self.keys)) or 'none'}"
            )
        if 2 * threshold <= sites:
            raise OperationError(
                f"a threshold of {threshold} of {sites} sites is not a majority: a scheduler "
                "telling sites different stories could then unmask one; raise it"
            )
        return threshold

    def enough(self, sites: dict[str, Any], threshold: int, what: str) -> None:
        """Refuse to go on with fewer than `threshold` sites left."""
        if len(sites) < threshold:
            raise OperationError(
                f"secure aggregation round {self.id}: {len(sites)} sites {what} "
                f"({', '.join(sorted(sites)) or 'none'}), fewer than its threshold of "
                f"{threshold}: it stops here and unmasks no one"
            )

    def mine(self) -> SiteSecrets:
        """This node's secrets, checked against the keys it advertised."""
        secrets = SiteSecrets.of(self.id, self.node)
        advertised = self.keys.get(self.node)
        if advertised is None:
            raise OperationError(f"{self.node} advertised no keys in round {self.id}")
        if (advertised.cipher_key, advertised.mask_key) != (secrets.cipher_key, secrets.mask_key):
            raise OperationError(
                f"{self.node} restarted since it advertised its keys for round {self.id}: its "
                "round secrets lived only in that process's memory, so it cannot take part"
            )
        return secrets


def _add(total: list[int], values: list[int], factor: int = 1) -> None:
    for i, value in enumerate(values):
        total[i] = (total[i] + factor * value) % masking.MODULUS


def _seed(secret: int) -> bytes:
    return secret.to_bytes(SECRET_BYTES, "big")


@register
class Keys(OperationDef):
    name: ClassVar[str] = SecureRound.KEYS.value

    def local(self, params: Any, ctx: JobContext) -> dict[str, Any]:
        mine = SiteSecrets.of(round_id(ctx.job), ctx.node)
        advertised = SecAggKeys(
            round=mine.round, site=ctx.node, cipher_key=mine.cipher_key, mask_key=mine.mask_key
        )
        return advertised.model_dump()


@register
class Deal(OperationDef):
    name: ClassVar[str] = SecureRound.SHARE.value
    Params = RoundParams

    def local(self, params: RoundParams, ctx: JobContext) -> dict[str, Any]:
        found = Round.of(ctx, params)
        mine = found.mine()
        threshold = found.threshold()
        every = {site: x for x, site in enumerate(sorted(found.keys), start=1)}
        points = {site: every[site] for site in found.circle(ctx.node)}
        size = (threshold - 1) * shamir.COEFFICIENT_BYTES
        self_mask = shamir.split(
            int.from_bytes(mine.self_seed, "big"),
            points.values(),
            threshold,
            mine.randomness("self-mask coefficients", size),
        )
        mask_key = shamir.split(
            int.from_bytes(mine.mask, "big"),
            points.values(),
            threshold,
            mine.randomness("mask-key coefficients", size),
        )
        sealed = {}
        for site, x in points.items():
            dealt = _Dealt(
                x=x, self_mask=format(self_mask[x], "x"), mask_key=format(mask_key[x], "x")
            )
            key = sealing_key(mine.cipher, found.keys[site].cipher_key, found.id, ctx.node, site)
            nonce, ciphertext = seal(
                key, dealt.model_dump_json().encode(), f"{found.id}|{ctx.node}|{site}"
            )
            sealed[site] = Sealed(nonce=nonce, ciphertext=ciphertext)
        return SecAggShares(round=found.id, site=ctx.node, sealed=sealed).model_dump()


@register
class Mask(OperationDef):
    name: ClassVar[str] = SecureRound.MASK.value
    Params = SummedParams

    def local(self, params: SummedParams, ctx: JobContext) -> dict[str, Any]:
        found = Round.of(ctx, params)
        mine = found.mine()
        dealt = {
            site: found.shares[site] for site in found.circle(ctx.node) if site in found.shares
        }
        found.enough(dealt, found.threshold(), "of its neighbourhood dealt shares")
        definition, inner = lookup(params.operation)
        own = dataclasses.replace(ctx, inputs=found.others)  # its data, budget, cancel
        values = summable.summand(definition, inner, own)
        count = summable.size(definition, inner)
        if len(values) != count:
            raise OperationError(f"{ctx.node}: {len(values)} numbers to sum, not {count}")
        masked = [value % masking.MODULUS for value in values]
        _add(masked, expand(mine.self_seed, count, masking.BITS))
        for site in dealt:
            if site != ctx.node:
                seed = pair_seed(mine.mask, found.keys[site].mask_key, found.id, ctx.node, site)
                _add(masked, expand(seed, count, masking.BITS), sign(ctx.node, site))
        hexed = [format(value, "x") for value in masked]
        return SecAggMasked(round=found.id, site=ctx.node, masked=hexed).model_dump()


@register
class Reveal(OperationDef):
    name: ClassVar[str] = SecureRound.REVEAL.value
    Params = RoundParams

    def local(self, params: RoundParams, ctx: JobContext) -> dict[str, Any]:
        found = Round.of(ctx, params)
        mine = found.mine()
        circle = found.circle(ctx.node)
        masked = {site: found.masked[site] for site in circle if site in found.masked}
        found.enough(masked, found.threshold(), "of its neighbourhood sent masked inputs")
        self_masks: dict[str, Share] = {}
        mask_keys: dict[str, Share] = {}
        for dealer, shares in found.shares.items():
            if dealer not in circle:
                continue
            box = shares.sealed.get(ctx.node)
            if box is None:
                raise OperationError(f"{ctx.node}: {dealer} dealt it no share")
            key = sealing_key(
                mine.cipher, found.keys[dealer].cipher_key, found.id, dealer, ctx.node
            )
            try:
                plain = unseal(key, box.nonce, box.ciphertext, f"{found.id}|{dealer}|{ctx.node}")
                dealt = _Dealt.model_validate_json(plain)
            except (SealError, ValidationError) as exc:
                raise OperationError(f"{ctx.node}: the shares {dealer} dealt it: {exc}") from None
            # Never both shares of one dealer: its mask key only if its input is missing.
            if dealer in found.masked:
                self_masks[dealer] = Share(x=dealt.x, y=dealt.self_mask)
            else:
                mask_keys[dealer] = Share(x=dealt.x, y=dealt.mask_key)
        revealed = SecAggReveal(
            round=found.id, site=ctx.node, self_masks=self_masks, mask_keys=mask_keys
        )
        return revealed.model_dump()


@register
class Unmask(OperationDef):
    name: ClassVar[str] = SecureRound.UNMASK.value
    Params = SummedParams

    def aggregate(self, params: SummedParams, ctx: JobContext) -> Any:
        found = Round.of(ctx, params)
        threshold = found.threshold()
        found.enough(found.masked, threshold, "sent masked inputs")
        found.enough(found.reveals, threshold, "revealed their shares")
        definition, inner = lookup(params.operation)
        count = summable.size(definition, inner)
        total = [0] * count
        for site, masked in found.masked.items():
            if len(masked.masked) != count:
                raise OperationError(f"{site} masked {len(masked.masked)} numbers, not {count}")
            _add(total, [int(value, 16) for value in masked.masked])
        for site in found.masked:
            seed = self._secret(found, site, threshold, lambda r: r.self_masks)
            _add(total, expand(seed, count, masking.BITS), -1)
        for dropped in sorted(set(found.shares) - set(found.masked)):
            key = self._secret(found, dropped, threshold, lambda r: r.mask_keys)
            if public_key(key) != found.keys[dropped].mask_key:
                raise OperationError(f"the shares revealed for {dropped} do not give its mask key")
            for site in set(found.masked) & set(found.circle(dropped)):
                seed = pair_seed(key, found.keys[site].mask_key, found.id, dropped, site)
                _add(total, expand(seed, count, masking.BITS), -sign(site, dropped))
        half = masking.MODULUS // 2
        signed = [value - masking.MODULUS if value >= half else value for value in total]
        return summable.total(definition, inner, signed)

    @staticmethod
    def _secret(
        found: Round, site: str, threshold: int, kind: Callable[[SecAggReveal], dict[str, Share]]
    ) -> bytes:
        """A secret of `site` from the shares the revealers gave of it."""
        shares = {
            kind(r)[site].x: int(kind(r)[site].y, 16)
            for r in found.reveals.values()
            if site in kind(r)
        }
        try:
            return _seed(shamir.combine(shares, threshold))
        except (shamir.ShareError, OverflowError) as exc:
            raise OperationError(f"round {found.id}: the secret of {site}: {exc}") from None
