"""The messages of secure aggregation: what each round's job produces.

They travel as job products: stored as JSON, named on the bus by a Resource with its
sha256 (in JobFinished, then in the JobReady of every job consuming it), so a reader of
the store cannot alter one unnoticed. None carries a site's value or a secret in clear:
keys are public, shares are sealed to their recipient, inputs are masked, and a revealed
share is one of `threshold` needed, given only for what the round needs.

Rounds (SecAgg, Bonawitz et al. 2017, with the dropout handling of SecAgg+, Bell et al.
2020): 1 `secagg_keys` → 2 `secagg_shares` → 3 `secagg_masked` → 4 `secagg_reveal` →
the initiator's sum. A masked `Sequential` hands its running value on as `masked_running`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from flotta_mqtt.model import SafeId
from flotta_mqtt.protocol.messages import Message

PublicKey = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # X25519, 32 bytes in hex
# An element of the masking ring Z/2**2176 (analytics/masking.py), in hex.
RingElement = Annotated[str, Field(pattern=r"^[0-9a-f]{1,544}$")]
# A Shamir share's value: an element of the prime field of 2**521 - 1, in hex.
FieldElement = Annotated[str, Field(pattern=r"^[0-9a-f]{1,131}$")]
# Which round of which step: "{artifact_id}/{step}/{iteration}"; every key and seed is
# derived for one round, so nothing from one round is of use in another.
RoundId = Annotated[str, Field(min_length=5, max_length=200)]
MAX_VALUES = 100_000  # numbers one site may contribute to one sum


class Sealed(Message):
    """Bytes encrypted and authenticated with AES-256-GCM under a key only the sender and
    the recipient can agree (X25519, then HKDF-SHA256)."""

    nonce: Annotated[str, Field(pattern=r"^[0-9a-f]{24}$")]
    ciphertext: Annotated[str, Field(pattern=r"^[0-9a-f]+$", min_length=32, max_length=2**22)]


class SecAggKeys(Message):
    """Round 1: a site's public keys for this round."""

    type: Literal["secagg_keys"] = "secagg_keys"
    round: RoundId
    site: SafeId
    cipher_key: PublicKey  # seals what is sent to this site
    mask_key: PublicKey  # agreed with each other site's into their pairwise mask


class SecAggShares(Message):
    """Round 2: a site's shares of its two seeds (its self mask's and its mask key), one
    per site of round 1, each sealed to that site."""

    type: Literal["secagg_shares"] = "secagg_shares"
    round: RoundId
    site: SafeId
    sealed: dict[SafeId, Sealed]


class SecAggMasked(Message):
    """Round 3: a site's input, masked by its self mask and by one pairwise mask per other
    site of round 2; alone it is uniformly random."""

    type: Literal["secagg_masked"] = "secagg_masked"
    round: RoundId
    site: SafeId
    masked: Annotated[list[RingElement], Field(min_length=1, max_length=MAX_VALUES)]


class Share(Message):
    """One Shamir share: the point x (its holder's place among the sites) and its value."""

    x: Annotated[int, Field(ge=1, le=100_000)]
    y: FieldElement


class SecAggReveal(Message):
    """Round 4: the shares a site that stayed reveals: of the self-mask seed of each site
    whose masked input came in, and of the mask key of each site that dealt shares but
    sent no masked input. Never both for one site."""

    type: Literal["secagg_reveal"] = "secagg_reveal"
    round: RoundId
    site: SafeId
    self_masks: dict[SafeId, Share]
    mask_keys: dict[SafeId, Share]


class MaskedRunning(Message):
    """A masked Sequential's running value, sealed to its next hop (ephemeral X25519 to
    the hop's advertised key); `reply_key` is the initiator's, to which the last worker
    seals it."""

    type: Literal["masked_running"] = "masked_running"
    round: RoundId
    ephemeral_key: PublicKey
    reply_key: PublicKey
    sealed: Sealed


SecAggProduct = Annotated[
    SecAggKeys | SecAggShares | SecAggMasked | SecAggReveal | MaskedRunning,
    Field(discriminator="type"),
]
