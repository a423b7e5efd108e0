"""What a node derives for one round of a secure aggregation or a masked Sequential."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from flotta_mqtt.analytics.secagg.crypto import VAULT, agree, public_key
from flotta_mqtt.protocol import JobReady


def round_id(job: JobReady) -> str:
    """The round a job belongs to: every job of one step in one iteration shares it."""
    return f"{job.artifact_id}/{job.step}/{job.iteration}"


@dataclass(frozen=True)
class SiteSecrets:
    """A node's private keys and self-mask seed for one round, from its process's vault."""

    round: str
    node: str
    cipher: bytes  # X25519: opens what is sealed to this node
    mask: bytes  # X25519: agreed with each other site into their pairwise mask
    self_seed: bytes  # stretched into this site's self mask

    @classmethod
    def of(cls, round_: str, node: str) -> SiteSecrets:
        return cls(
            round_,
            node,
            VAULT.secret("cipher", round_, node),
            VAULT.secret("mask", round_, node),
            VAULT.secret("self", round_, node),
        )

    @property
    def cipher_key(self) -> str:
        return public_key(self.cipher)

    @property
    def mask_key(self) -> str:
        return public_key(self.mask)

    def randomness(self, purpose: str, size: int) -> bytes:
        """`size` more derived bytes for this node and round (Shamir coefficients)."""
        chunks = [
            VAULT.secret(purpose, self.round, self.node, str(i), size=min(4096, size - start))
            for i, start in enumerate(range(0, size, 4096))
        ]
        return b"".join(chunks)


def sealing_key(private: bytes, peer: str, round_: str, sender: str, recipient: str) -> bytes:
    """The AES key for what `sender` seals to `recipient` (static X25519 keys of both)."""
    return agree(private, peer, "seal", round_, *sorted((sender, recipient)))


def pair_seed(private: bytes, peer: str, round_: str, a: str, b: str) -> bytes:
    """The seed of the pairwise mask of sites `a` and `b`, which both derive."""
    return agree(private, peer, "mask", round_, *sorted((a, b)))


def sign(site: str, other: str) -> int:
    """Whether `site` adds (+1) or subtracts (-1) the mask it shares with `other`."""
    return 1 if site < other else -1


def neighbourhoods(round_: str, sites: list[str], neighbours: int | None) -> dict[str, list[str]]:
    """Each site's neighbourhood, itself included: SecAgg+'s communication graph.

    None (or as many neighbours as there are other sites): everyone, as in SecAgg. Else a
    Harary graph: the sites on a ring shuffled by the round (so every node draws the same
    one), each joined to the `neighbours // 2` nearest on either side. It is symmetric,
    as pairwise masks need: u is v's neighbour exactly when v is u's.
    """
    ring = sorted(sites)
    reach = (neighbours or len(ring)) // 2
    if 2 * reach + 1 >= len(ring):
        return {site: ring for site in ring}
    random.Random(hashlib.sha256(round_.encode()).digest()).shuffle(ring)
    n = len(ring)
    return {
        site: sorted(ring[(i + d) % n] for d in range(-reach, reach + 1))
        for i, site in enumerate(ring)
    }
