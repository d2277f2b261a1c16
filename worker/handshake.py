"""The handshake, both halves, pure: no I/O; time and randomness can be passed in.

::

    client                                    worker
    hello(service key) ──── request ────>     accept(request, opened)   (bad_payload?)
                                              answer(request, accepted, RSA key, now)
    finish(hello, value) <── ok reply ───     (session record + reply, one atomic step)

The client draws ``Kb`` and an X25519 pair (``ec``, ``Ec``) and seals
``{clientEphemeral: Ec, ttl}`` under the service key with ``K`` = ``Kb``. The worker
draws (``ew``, ``Ew``); both sides derive ``Ks`` = HKDF(``Kb`` || X25519, info
``sealstream/1 session|sid|hex Ec|hex Ew``), so a later theft of the service key does
not reveal ``Ks`` (docs/protocol.md, "Handshake"). Where the bytes come from (the
request stream, the key pool's threads, the replay record) is the caller's business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa, x25519

from worker import codec, envelopes
from worker.codec import Field
from worker.crypto import (
    handshake_session_key,
    kid_of,
    x25519_keypair,
    x25519_public,
    x25519_shared,
)
from worker.errors import BadPayload, Malformed
from worker.keys import load_public_key
from worker.protocol import ALG_RSA, HANDSHAKE_TYPE, KEY_SIZE, X25519_SIZE, new_id
from worker.sessions import DEFAULT_TTL_S, Session, clamp_ttl, new_session
from worker.wire import Request

_HELLO_FIELDS = frozenset({"clientEphemeral", "ttl"})


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionGrant:
    """What a client needs to use a session: give it only over a secure channel."""

    sid: str
    public_key_pem: str
    session_key: bytes = field(repr=False)
    expires_at: int


# -- client --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """A sealed handshake request, and the secrets the client keeps to finish it."""

    outgoing: envelopes.Outgoing
    ephemeral: x25519.X25519PrivateKey = field(repr=False)
    client_ephemeral: bytes

    @property
    def request(self) -> Request:
        """The handshake request to send."""
        return self.outgoing.request


def hello_plaintext(client_ephemeral: bytes, field: Field, *, ttl_s: int | None) -> bytes:
    """The handshake's plaintext: ``clientEphemeral`` and, unless None, ``ttl``."""
    body: dict[str, Any] = {"clientEphemeral": codec.to_wire_binary(client_ephemeral, field)}
    if ttl_s is not None:
        body["ttl"] = ttl_s
    return codec.dumps(body, field)


def seal_hello(
    service_key: rsa.RSAPublicKey,
    plaintext: bytes,
    *,
    field: Field,
    sid: str,
    mid: str,
    ts: int,
    kb: bytes,
    kid: str | None = None,
) -> envelopes.Outgoing:
    """``plaintext`` sealed as a handshake: ``Kb`` wrapped under the service key, whose
    ``kid`` is set (or ``kid`` as given); the reply opens under ``Kb``."""
    return envelopes.seal_request(
        field=field,
        alg=ALG_RSA,
        sid=sid,
        mid=mid,
        ts=ts,
        type_=HANDSHAKE_TYPE,
        plaintext=plaintext,
        public_key=service_key,
        kid=kid if kid is not None else kid_of(service_key),
        key=kb,
    )


def hello(
    service_key: rsa.RSAPublicKey,
    *,
    field: Field,
    now_ms: int,
    ttl_s: int | None = DEFAULT_TTL_S,
    sid: str | None = None,
    mid: str | None = None,
    kb: bytes | None = None,
    ephemeral: x25519.X25519PrivateKey | None = None,
) -> Hello:
    """A new handshake for ``service_key`` (client side), stamped ``now_ms``.

    ``sid``, ``mid``, ``Kb`` and the X25519 key are drawn fresh unless given.
    """
    if ephemeral is None:
        ephemeral, ec = x25519_keypair()
    else:
        ec = x25519_public(ephemeral)
    out = seal_hello(
        service_key,
        hello_plaintext(ec, field, ttl_s=ttl_s),
        field=field,
        sid=sid or new_id(),
        mid=mid or new_id(),
        ts=now_ms,
        kb=kb if kb is not None else os.urandom(KEY_SIZE),
    )
    return Hello(outgoing=out, ephemeral=ephemeral, client_ephemeral=ec)


def finish(sent: Hello, value: Any) -> SessionGrant:
    """The session from the worker's ``ok`` reply value (client side).

    Raises :class:`Malformed` when the value is not the protocol's answer to ``sent``
    (another ``sessionId``, a missing field, an ``Ew`` that is not 32 bytes or that
    X25519 refuses), and ``ConfigError`` when ``publicKey`` is not an RSA PEM key.
    """
    request = sent.request
    try:
        if not isinstance(value, dict) or value.get("sessionId") != request.sid:
            raise Malformed("handshake reply is not for this session")
        ew = codec.binary(value["serverEphemeral"], request.field)
        ks = handshake_session_key(
            kb=sent.outgoing.reply_key,
            shared=x25519_shared(sent.ephemeral, ew),
            sid=request.sid,
            client_ephemeral=sent.client_ephemeral,
            worker_ephemeral=ew,
        )
        pem = value["publicKey"]
        load_public_key(pem, what="session public key")
        return SessionGrant(
            sid=request.sid, public_key_pem=pem, session_key=ks, expires_at=int(value["expiresAt"])
        )
    except (KeyError, TypeError, ValueError, codec.DecodeError):
        raise Malformed("the handshake reply is not the protocol's") from None


# -- worker --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Accepted:
    """A hello the worker accepts: the new session's key and lifetime, and ``Ew``."""

    ks: bytes = field(repr=False)
    ttl_s: int
    server_ephemeral: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The new session (its record is stored with the reply) and the ``ok`` plaintext."""

    session: Session
    plaintext: bytes


def accept(
    request: Request,
    opened: envelopes.Opened,
    *,
    max_ttl_s: int,
    ephemeral: x25519.X25519PrivateKey | None = None,
) -> Accepted:
    """Read an opened hello and derive ``Ks`` (worker side; ``opened.reply_key`` is Kb).

    Raises :class:`BadPayload` (answered ``bad_payload`` under Kb) for anything but
    ``clientEphemeral`` (32 bytes X25519 accepts) and an optional integer ``ttl``,
    which is clamped to 60..``max_ttl_s`` seconds.
    """
    try:
        ec, ttl_s = _read_hello(codec.loads(opened.plaintext, request.field), request.field)
        if ephemeral is None:
            ephemeral, ew = x25519_keypair()
        else:
            ew = x25519_public(ephemeral)
        shared = x25519_shared(ephemeral, ec)
    except BadPayload:
        raise
    except (codec.DecodeError, ValueError):
        raise BadPayload("invalid handshake payload") from None
    ks = handshake_session_key(
        kb=opened.reply_key,
        shared=shared,
        sid=request.sid,
        client_ephemeral=ec,
        worker_ephemeral=ew,
    )
    return Accepted(ks=ks, ttl_s=clamp_ttl(ttl_s, max_ttl_s), server_ephemeral=ew)


def answer(
    request: Request,
    accepted: Accepted,
    *,
    private_key: rsa.RSAPrivateKey,
    now_ms: int,
    max_ttl_s: int,
) -> Answer:
    """The session for an accepted hello, with the new RSA key ``private_key``, created
    ``now_ms``, and the plaintext of the ``ok`` reply (worker side)."""
    session = new_session(
        request.sid,
        ks=accepted.ks,
        now_ms=now_ms,
        ttl_s=accepted.ttl_s,
        max_ttl_s=max_ttl_s,
        private_key=private_key,
    )
    body = {
        "sessionId": request.sid,
        "publicKey": session.public_pem,
        "serverEphemeral": codec.to_wire_binary(accepted.server_ephemeral, request.field),
        "expiresAt": session.expires,
    }
    return Answer(session=session, plaintext=codec.dumps(body, request.field))


def _read_hello(value: Any, field: Field) -> tuple[bytes, int]:
    if not isinstance(value, dict) or "clientEphemeral" not in value:
        raise BadPayload("the handshake needs clientEphemeral")
    if not set(value) <= _HELLO_FIELDS:
        raise BadPayload("unknown handshake fields")
    try:
        ec = codec.binary(value["clientEphemeral"], field)
    except codec.DecodeError:
        raise BadPayload("clientEphemeral is not binary") from None
    if len(ec) != X25519_SIZE:
        raise BadPayload("clientEphemeral must be 32 bytes")
    ttl = value.get("ttl", DEFAULT_TTL_S)
    if not codec.is_int(ttl):
        raise BadPayload("ttl must be an integer number of seconds")
    return ec, ttl
