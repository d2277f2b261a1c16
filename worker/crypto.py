"""The protocol's cryptographic primitives: AAD, HKDF, AES-GCM, RSA-OAEP, X25519.

No I/O and no clocks. Every failure to open is one opaque :class:`DecryptError`
raised ``from None``: an RSA unwrap failure substitutes a random key and lets the
GCM tag check fail on the same path, so there is no padding or tag oracle.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from worker.errors import DecryptError
from worker.protocol import IV_SIZE, KEY_SIZE, TAG_SIZE, X25519_SIZE
from worker.randomness import fresh_iv, fresh_key
from worker.values import builder

_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sealed:
    """An AES-256-GCM output: 12-byte ``iv``, ``ciphertext`` and 16-byte ``tag``."""

    iv: bytes
    ciphertext: bytes
    tag: bytes


_sealed = builder(Sealed)  # per message: see worker.values


def request_aad(alg: str, sid: str, mid: str, ts: int, type_: str) -> bytes:
    """``sealstream/1|req|{alg}|{sid}|{mid}|{ts}|{type}`` as ASCII bytes."""
    return f"sealstream/1|req|{alg}|{sid}|{mid}|{ts}|{type_}".encode("ascii")


def reply_aad(alg: str, sid: str, mid: str, status: str) -> bytes:
    """``sealstream/1|rep|{alg}|{sid}|{mid}|{status}`` as ASCII bytes."""
    return f"sealstream/1|rep|{alg}|{sid}|{mid}|{status}".encode("ascii")


def hkdf_sha256(ikm: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    """HKDF-SHA256 with an empty salt."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"", info=info).derive(ikm)


_IPAD: Final = bytes(x ^ 0x36 for x in range(256))
_OPAD: Final = bytes(x ^ 0x5C for x in range(256))


@functools.lru_cache(maxsize=16_384)
def _expander(ks: bytes) -> tuple[Any, Any]:
    # HKDF-Extract with an empty salt (HashLen zero bytes) is the same for every message
    # of a session: PRK, and HMAC-SHA256 keyed with it (its inner and outer hashes with
    # the padded key absorbed, RFC 2104), are made once per session key.
    prk = hmac.digest(bytes(32), ks, "sha256").ljust(64, b"\0")
    return hashlib.sha256(prk.translate(_IPAD)), hashlib.sha256(prk.translate(_OPAD))


def _expand32(ks: bytes, info: bytes) -> bytes:
    # HKDF-Expand for L = 32 (one SHA-256 block): T(1) = HMAC(PRK, info || 0x01).
    inner, outer = _expander(ks)
    h = inner.copy()
    h.update(info + b"\x01")
    o = outer.copy()
    o.update(h.digest())
    return o.digest()  # type: ignore[no-any-return]


def sk_request_key(ks: bytes, mid: str) -> bytes:
    """Session-key mode request key: HKDF(Ks, info=``sealstream/1 req <mid>``)."""
    return _expand32(ks, b"sealstream/1 req " + mid.encode("ascii"))


def sk_reply_key(ks: bytes, mid: str) -> bytes:
    """Session-key mode reply key: HKDF(Ks, info=``sealstream/1 rep <mid>``)."""
    return _expand32(ks, b"sealstream/1 rep " + mid.encode("ascii"))


def seal(key: bytes, plaintext: bytes, aad: bytes, *, iv: bytes | None = None) -> Sealed:
    """AES-256-GCM under ``key`` with a fresh random 12-byte iv (or the one given)."""
    if len(key) != KEY_SIZE:
        raise ValueError("AES-256-GCM needs a 32-byte key")
    nonce = fresh_iv() if iv is None else iv
    if len(nonce) != IV_SIZE:
        raise ValueError("the iv must be 12 bytes")
    out = AESGCM(key).encrypt(nonce, plaintext, aad)
    return _sealed(iv=nonce, ciphertext=out[:-TAG_SIZE], tag=out[-TAG_SIZE:])


def open_sealed(key: bytes, sealed: Sealed, aad: bytes) -> bytes:
    """Open an AES-256-GCM box; any failure is one opaque :class:`DecryptError`."""
    if len(key) != KEY_SIZE or len(sealed.iv) != IV_SIZE or len(sealed.tag) != TAG_SIZE:
        raise DecryptError("cannot open") from None
    try:
        return AESGCM(key).decrypt(sealed.iv, sealed.ciphertext + sealed.tag, aad)
    except InvalidTag:
        raise DecryptError("cannot open") from None


def wrap_key(public_key: rsa.RSAPublicKey, key: bytes) -> bytes:
    """RSA-OAEP (SHA-256, MGF1-SHA-256, empty label) of ``key`` under ``public_key``."""
    return public_key.encrypt(key, _OAEP)


def unwrap_key(private_key: rsa.RSAPrivateKey, wrapped: bytes) -> bytes:
    """Unwrap a 32-byte key; on any failure return a random key instead of raising.

    The caller then fails the GCM tag check on the same path as a wrong tag, so an
    attacker cannot tell a padding failure from a tag failure.
    """
    substitute = fresh_key()
    try:
        key = private_key.decrypt(wrapped, _OAEP)
    except ValueError:
        return substitute
    return key if len(key) == KEY_SIZE else substitute


def modulus_bytes(public_key: rsa.RSAPublicKey) -> int:
    """The RSA modulus size in bytes: the exact length of a wrapped key."""
    return (public_key.key_size + 7) // 8


def spki_der(public_key: rsa.RSAPublicKey) -> bytes:
    """The SubjectPublicKeyInfo DER encoding of ``public_key``."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_pem(public_key: rsa.RSAPublicKey) -> str:
    """The PEM (``BEGIN PUBLIC KEY``) encoding of ``public_key``."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def kid_of(public_key: rsa.RSAPublicKey) -> str:
    """The key id: lowercase hex SHA-256 of the public key's SPKI DER."""
    return hashlib.sha256(spki_der(public_key)).hexdigest()


def x25519_keypair() -> tuple[x25519.X25519PrivateKey, bytes]:
    """A fresh X25519 pair: the private key and the raw 32-byte public key."""
    private = x25519.X25519PrivateKey.generate()
    return private, x25519_public(private)


def x25519_public(private: x25519.X25519PrivateKey) -> bytes:
    """The raw 32-byte public value of an X25519 private key."""
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def x25519_shared(private: x25519.X25519PrivateKey, peer: bytes) -> bytes:
    """X25519 agreement; ``ValueError`` for a malformed or low-order peer key."""
    if len(peer) != X25519_SIZE:
        raise ValueError("an X25519 public key is 32 bytes")
    # cryptography refuses an all-zero shared secret (a low-order peer) with ValueError.
    return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer))


def handshake_session_key(
    *, kb: bytes, shared: bytes, sid: str, client_ephemeral: bytes, worker_ephemeral: bytes
) -> bytes:
    """Ks = HKDF(Kb || X25519(Ew, Ec), info=``sealstream/1 session|sid|hex Ec|hex Ew``)."""
    info = f"sealstream/1 session|{sid}|{client_ephemeral.hex()}|{worker_ephemeral.hex()}"
    return hkdf_sha256(kb + shared, info.encode("ascii"))
