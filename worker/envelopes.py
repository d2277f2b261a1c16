"""Opening requests and sealing replies (worker side), and the reverse (client side).

Pure: takes decoded :mod:`worker.wire` values and keys, returns values. The RSA
paths are slow (~1 ms of RSA); callers run them off the event loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from worker.codec import Field
from worker.crypto import (
    Sealed,
    open_sealed,
    reply_aad,
    request_aad,
    seal,
    sk_reply_key,
    sk_request_key,
    unwrap_key,
    wrap_key,
)
from worker.errors import DecryptError
from worker.protocol import ALG_RSA, KEY_SIZE
from worker.values import builder
from worker.wire import Reply, Request, encode_reply_fields


@dataclass(frozen=True, slots=True, kw_only=True)
class Opened:
    """An authenticated request's plaintext and the key its reply is sealed under."""

    plaintext: bytes = field(repr=False)
    reply_key: bytes = field(repr=False)


_opened = builder(Opened)  # per message: see worker.values
_sealed_box = builder(Sealed)


def open_request(
    request: Request, *, private_key: rsa.RSAPrivateKey | None = None, ks: bytes | None = None
) -> Opened:
    """Authenticate and decrypt a request; one opaque :class:`DecryptError` on failure.

    ``RSA-OAEP-256+A256GCM`` needs ``private_key`` (the session's, or the service
    key for a handshake) and ``SK+A256GCM`` needs the session key ``ks``. The
    caller has already checked ``encryptedAesKey`` is exactly the modulus size.
    """
    if request.alg == ALG_RSA:
        if private_key is None or request.encrypted_aes_key is None:
            raise DecryptError("cannot open") from None
        return open_unwrapped(request, unwrap_key(private_key, request.encrypted_aes_key))
    if ks is None:
        raise DecryptError("cannot open") from None
    aad = request_aad(request.alg, request.sid, request.mid, request.ts, request.type)
    box = _sealed_box(iv=request.iv, ciphertext=request.encrypted_data, tag=request.auth_tag)
    plaintext = open_sealed(sk_request_key(ks, request.mid), box, aad)
    return _opened(plaintext=plaintext, reply_key=sk_reply_key(ks, request.mid))


def open_unwrapped(request: Request, key: bytes) -> Opened:
    """Open an ``RSA-OAEP-256+A256GCM`` request whose ``encryptedAesKey`` was already
    unwrapped to ``key`` (:func:`worker.crypto.unwrap_key`: a random key when it failed
    to unwrap); one opaque :class:`DecryptError` on failure."""
    aad = request_aad(request.alg, request.sid, request.mid, request.ts, request.type)
    box = _sealed_box(iv=request.iv, ciphertext=request.encrypted_data, tag=request.auth_tag)
    return _opened(plaintext=open_sealed(key, box, aad), reply_key=key)


def seal_reply(
    request: Request, reply_key: bytes, status: str, plaintext: bytes, *, iv: bytes | None = None
) -> Reply:
    """An ``ok``/``error`` reply to ``request``, sealed with a fresh iv (or ``iv``)."""
    return Reply(field=request.field, **_sealed(request, reply_key, status, plaintext, iv))


def seal_reply_entry(
    request: Request, reply_key: bytes, status: str, plaintext: bytes, *, iv: bytes | None = None
) -> dict[str, bytes]:
    """``wire.encode_reply(seal_reply(...))`` in one step (the worker's hot path)."""
    return encode_reply_fields(request.field, **_sealed(request, reply_key, status, plaintext, iv))


def _sealed(
    request: Request, reply_key: bytes, status: str, plaintext: bytes, iv: bytes | None
) -> dict[str, Any]:
    """The members of a sealed reply to ``request`` but its field."""
    box = seal(
        reply_key, plaintext, reply_aad(request.alg, request.sid, request.mid, status), iv=iv
    )
    return {
        "alg": request.alg,
        "sid": request.sid,
        "mid": request.mid,
        "status": status,
        "iv": box.iv,
        "encrypted_data": box.ciphertext,
        "auth_tag": box.tag,
    }


def notice(*, field: Field, sid: str, mid: str, code: str, alg: str | None) -> Reply:
    """An unauthenticated ``rejected`` notice with ``code``."""
    return Reply(field=field, alg=alg, sid=sid, mid=mid, status="rejected", code=code)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outgoing:
    """A sealed request and the key that will open its reply."""

    request: Request
    reply_key: bytes = field(repr=False)


def seal_request(
    *,
    field: Field,
    alg: str,
    sid: str,
    mid: str,
    ts: int,
    type_: str,
    plaintext: bytes,
    public_key: rsa.RSAPublicKey | None = None,
    ks: bytes | None = None,
    kid: str | None = None,
    key: bytes | None = None,
) -> Outgoing:
    """Seal a request (client side). RSA mode draws K (or uses ``key``, e.g. Kb)."""
    aad = request_aad(alg, sid, mid, ts, type_)
    if alg == ALG_RSA:
        if public_key is None:
            raise ValueError(f"{ALG_RSA} needs the session (or service) public key")
        k = key if key is not None else os.urandom(KEY_SIZE)
        box = seal(k, plaintext, aad)
        wrapped: bytes | None = wrap_key(public_key, k)
        reply_key = k
    else:
        if ks is None:
            raise ValueError("SK+A256GCM needs the session key")
        box = seal(sk_request_key(ks, mid), plaintext, aad)
        wrapped = None
        reply_key = sk_reply_key(ks, mid)
    request = Request(
        field=field,
        alg=alg,
        sid=sid,
        mid=mid,
        ts=ts,
        type=type_,
        iv=box.iv,
        encrypted_data=box.ciphertext,
        auth_tag=box.tag,
        encrypted_aes_key=wrapped,
        kid=kid,
    )
    return Outgoing(request=request, reply_key=reply_key)


def open_reply(reply: Reply, *, reply_key: bytes, request: Request) -> bytes:
    """Verify an ``ok``/``error`` reply belongs to ``request`` and decrypt it."""
    if (
        reply.sid != request.sid
        or reply.mid != request.mid
        or reply.alg != request.alg
        or reply.iv is None
        or reply.encrypted_data is None
        or reply.auth_tag is None
    ):
        raise DecryptError("cannot open") from None
    box = Sealed(iv=reply.iv, ciphertext=reply.encrypted_data, tag=reply.auth_tag)
    return open_sealed(
        reply_key, box, reply_aad(request.alg, request.sid, request.mid, reply.status)
    )
