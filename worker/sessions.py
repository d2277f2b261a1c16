"""Sessions: their secrets, and the sealed record kept in Redis. Pure, no I/O.

The record is a MessagePack map ``{"v": 1, "kek": kekId, "n": nonce, "c": ct}``
where ``c`` is AES-256-GCM under that KEK (AAD ``sealstream/1 session|sid|kekId``)
of ``{"priv": PKCS#8 DER, "pub": SPKI DER, "ks": 32 bytes, "created": ms,
"expires": ms}``. Nothing secret is ever stored unwrapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from worker.codec import DecodeError, is_int, loads
from worker.crypto import Sealed, modulus_bytes, open_sealed, seal, spki_pem
from worker.errors import DecryptError
from worker.keys import MasterKey, MasterKeys
from worker.protocol import IV_SIZE, KEY_SIZE, TAG_SIZE

DEFAULT_TTL_S = 3600
MIN_TTL_S = 60
MAX_TTL_S = 86400
DEFAULT_KEY_BITS = 2048


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """An open session: its RSA pair, session key ``ks`` and lifetime (ms)."""

    sid: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    ks: bytes = field(repr=False)
    created: int
    expires: int
    #: the private key as PKCS#8 DER, when it was opened from a record (the unwrap
    #: processes load it from there; see worker.unwrapping)
    private_der: bytes | None = field(default=None, repr=False, compare=False)

    def private_key_der(self) -> bytes:
        """The private key as PKCS#8 DER."""
        if self.private_der is not None:
            return self.private_der
        return self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        """The session public key clients wrap request keys under."""
        return self.private_key.public_key()

    @property
    def public_pem(self) -> str:
        """The session public key as PEM SPKI."""
        return spki_pem(self.public_key)

    @property
    def wrapped_key_size(self) -> int:
        """Exact length of an ``encryptedAesKey`` for this session."""
        return modulus_bytes(self.public_key)

    def expired(self, now_ms: int) -> bool:
        """Whether the session is past its sealed expiry."""
        return now_ms >= self.expires


def clamp_ttl(ttl_s: int, max_ttl_s: int = MAX_TTL_S) -> int:
    """Clamp a requested session lifetime to 60..``max_ttl_s`` (default 86400) seconds."""
    return max(MIN_TTL_S, min(max_ttl_s, ttl_s))


def new_session(
    sid: str,
    *,
    ks: bytes,
    now_ms: int,
    ttl_s: int = DEFAULT_TTL_S,
    bits: int = DEFAULT_KEY_BITS,
    max_ttl_s: int = MAX_TTL_S,
    private_key: rsa.RSAPrivateKey | None = None,
) -> Session:
    """Create a session: ``private_key``, or a fresh RSA pair (slow: off the event loop).

    The lifetime is ``ttl_s`` clamped to 60..``max_ttl_s`` seconds.
    """
    if len(ks) != KEY_SIZE:
        raise ValueError("a session key is 32 bytes")
    key = private_key or rsa.generate_private_key(public_exponent=65537, key_size=bits)
    expires = now_ms + clamp_ttl(ttl_s, max_ttl_s) * 1000
    return Session(sid=sid, private_key=key, ks=ks, created=now_ms, expires=expires)


def _record_aad(sid: str, kek_id: str) -> bytes:
    return f"sealstream/1 session|{sid}|{kek_id}".encode("ascii")


def seal_record(session: Session, kek: MasterKey) -> bytes:
    """The session's sealed record, as stored at ``P:{sid}:session``."""
    inner = msgpack.packb(
        {
            "priv": session.private_key_der(),
            "pub": session.public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "ks": session.ks,
            "created": session.created,
            "expires": session.expires,
        },
        use_bin_type=True,
    )
    box = seal(kek.key, inner, _record_aad(session.sid, kek.id), iv=os.urandom(IV_SIZE))
    return msgpack.packb(  # type: ignore[no-any-return]
        {"v": 1, "kek": kek.id, "n": box.iv, "c": box.ciphertext + box.tag},
        use_bin_type=True,
    )


def open_record(sid: str, raw: bytes, keks: MasterKeys) -> Session:
    """Open a sealed record; one opaque :class:`DecryptError` for every failure.

    The private key is loaded without RSA validation: the record is authenticated
    by AES-GCM under our KEK and we generated the key ourselves, so the ~50 ms
    validation would buy nothing on every request.
    """
    try:
        outer = loads(raw, "e")
        if not isinstance(outer, dict) or set(outer) != {"v", "kek", "n", "c"}:
            raise DecryptError("cannot open")
        kek = keks.get(outer["kek"]) if isinstance(outer["kek"], str) else None
        if not is_int(outer["v"]) or outer["v"] != 1 or kek is None:
            raise DecryptError("cannot open")
        n, c = outer["n"], outer["c"]
        if not isinstance(n, bytes) or not isinstance(c, bytes) or len(c) < TAG_SIZE:
            raise DecryptError("cannot open")
        box = Sealed(iv=n, ciphertext=c[:-TAG_SIZE], tag=c[-TAG_SIZE:])
        inner = loads(open_sealed(kek.key, box, _record_aad(sid, kek.id)), "e")
        return _session_from(sid, inner)
    except (DecodeError, ValueError, TypeError, KeyError):
        raise DecryptError("cannot open") from None


def _session_from(sid: str, inner: Any) -> Session:
    if not isinstance(inner, dict) or set(inner) != {"priv", "pub", "ks", "created", "expires"}:
        raise DecryptError("cannot open")
    if not (isinstance(inner["ks"], bytes) and len(inner["ks"]) == KEY_SIZE):
        raise DecryptError("cannot open")
    if not (is_int(inner["created"]) and is_int(inner["expires"])):
        raise DecryptError("cannot open")
    key = serialization.load_der_private_key(
        inner["priv"], password=None, unsafe_skip_rsa_key_validation=True
    )
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DecryptError("cannot open")
    return Session(
        sid=sid,
        private_key=key,
        ks=inner["ks"],
        created=inner["created"],
        expires=inner["expires"],
        private_der=inner["priv"],
    )
