"""The cryptography of secure aggregation, in one place (the only importer of `cryptography`).

- A `Vault` per process derives every secret a node uses in a round (X25519 private keys,
  self-mask seeds, Shamir coefficients) from a key drawn when the process starts and
  kept only in its memory: no secret is ever stored, and a retried job derives the same.
- `agree`: X25519, then HKDF-SHA256 bound to the purpose, the round and both parties.
- `seal`/`unseal`: AES-256-GCM, the round and both parties as associated data.
- `expand`: a seed stretched into ring elements with SHAKE-256 (an extendable-output
  function, used as the pseudo-random generator of the masks).
"""

from __future__ import annotations

import hashlib
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_BYTES = 32
NONCE_BYTES = 12


class SealError(ValueError):
    """A sealed message does not open: the wrong key, another round, or tampering."""


def _info(purpose: str, labels: tuple[str, ...]) -> bytes:
    # Labels are node names, round ids and indices: none holds a NUL, so this is unambiguous.
    return "\x00".join(("flotta-secagg", purpose, *labels)).encode()


def _hkdf(material: bytes, size: int, purpose: str, labels: tuple[str, ...]) -> bytes:
    return HKDF(SHA256(), size, salt=None, info=_info(purpose, labels)).derive(material)


class Vault:
    """A node's secrets for the rounds it takes part in, derived, never stored.

    If its process restarts mid-round, its keys change: what was sealed to it no longer
    opens, and its job fails with an error saying so instead of unmasking anyone.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(KEY_BYTES)

    def secret(self, purpose: str, *labels: str, size: int = KEY_BYTES) -> bytes:
        """`size` bytes for one purpose in one round (HKDF-Expand allows up to 8160)."""
        return _hkdf(self._key, size, purpose, labels)


VAULT = Vault()


def public_key(private: bytes) -> str:
    """The X25519 public key of a 32-byte private key, in hex."""
    key = X25519PrivateKey.from_private_bytes(private).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def new_private_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def agree(private: bytes, peer: str, purpose: str, *labels: str) -> bytes:
    """A 32-byte key both parties derive: X25519 of one's private and the other's public
    key, through HKDF bound to `purpose` and `labels` (the round, both parties)."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(bytes.fromhex(peer))
        )
    except ValueError as exc:  # a low-order point: no shared secret
        raise SealError(f"no key agreement with public key {peer[:16]}…: {exc}") from None
    return _hkdf(shared, KEY_BYTES, purpose, labels)


def seal(key: bytes, plaintext: bytes, context: str) -> tuple[str, str]:
    """(nonce, ciphertext) in hex: AES-256-GCM under `key`, authenticating `context`."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce.hex(), AESGCM(key).encrypt(nonce, plaintext, context.encode()).hex()


def unseal(key: bytes, nonce: str, ciphertext: str, context: str) -> bytes:
    try:
        return AESGCM(key).decrypt(
            bytes.fromhex(nonce), bytes.fromhex(ciphertext), context.encode()
        )
    except InvalidTag:
        raise SealError("a sealed message does not open with this key and context") from None


def expand(seed: bytes, count: int, bits: int) -> list[int]:
    """`count` uniform integers below 2**bits (bits a multiple of 8) from a seed."""
    size = bits // 8
    stream = hashlib.shake_256(seed).digest(count * size)
    return [int.from_bytes(stream[i * size : (i + 1) * size], "big") for i in range(count)]
