"""After a run, Redis holds no key, secret or plaintext in any form."""

from __future__ import annotations

import base64
import os

import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization

from tests.helpers import Raw, now_ms, open_ok
from worker import wire
from worker.crypto import (
    sk_reply_key,
    sk_request_key,
)
from worker.demo_app import app
from worker.handshake import SessionGrant, finish, hello
from worker.protocol import ALG_RSA, ALG_SK
from worker.sessions import open_record
from worker.settings import Settings
from worker.testing import ThrowawayKeys, running_worker


def _forms(secret: bytes) -> list[bytes]:
    """The secret raw, as hex, and as base64 at each of the three alignments."""
    forms = [secret, secret.hex().encode()]
    for skip in range(3):
        b64 = base64.b64encode(secret[skip:])
        forms.append(b64[: len(b64) - 4])
    return forms


async def _dump(redis: aioredis.Redis, prefix: str) -> list[bytes]:
    values: list[bytes] = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=500):
        kind = (await redis.type(key)).decode()
        values.append(key)
        if kind == "string":
            values.append(await redis.get(key))
        elif kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                values += [k, v]
        elif kind == "stream":
            for _, fields in await redis.xrange(key):
                for k, v in fields.items():
                    values += [k, v]
        else:
            raise AssertionError(f"unexpected key type {kind} at {key!r}")
    return values


async def _handshake(
    raw: Raw, keys: ThrowawayKeys, field: wire.Field
) -> tuple[SessionGrant, bytes]:
    sent = hello(keys.service.public_key, field=field, now_ms=now_ms(), ttl_s=None)
    await raw.send(sent.request)
    reply = await raw.reply(sent.request.sid, sent.request.mid)
    return finish(sent, open_ok(reply, sent.outgoing)), sent.outgoing.reply_key


async def test_no_secret_or_plaintext_in_redis(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Kb, Ks, every K, private keys, the KEK and plaintexts appear nowhere in Redis."""
    raw = Raw(redis, settings.prefix, keys)
    secrets: dict[str, bytes] = {}
    async with running_worker(app, settings, keys):
        fields: tuple[wire.Field, ...] = ("e", "j")
        for n, field in enumerate(fields):
            grant, kb = await _handshake(raw, keys, field)
            secrets[f"kb{n}"], secrets[f"ks{n}"] = kb, grant.session_key
            for alg in (ALG_SK, ALG_RSA):
                marker = f"PLAINTEXT-{os.urandom(8).hex()}"
                out = raw.seal(grant, {"secret": marker}, alg=alg, field=field)
                await raw.send(out.request)
                reply = await raw.reply(grant.sid, out.request.mid)
                assert "ok" == reply.status
                secrets[f"plaintext {marker}"] = marker.encode()
                secrets[f"reply key {out.request.mid}"] = out.reply_key
                if alg == ALG_SK:
                    secrets[f"req key {out.request.mid}"] = sk_request_key(
                        grant.session_key, out.request.mid
                    )
                    secrets[f"rep key {out.request.mid}"] = sk_reply_key(
                        grant.session_key, out.request.mid
                    )
            record = await raw.store.get_session(grant.sid)
            assert record is not None
            session = open_record(grant.sid, record, keys.master)
            secrets[f"session private key {n}"] = session.private_key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
    secrets["service private key"] = keys.service.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    secrets["kek"] = keys.master.active.key
    values = await _dump(redis, settings.prefix)
    assert len(values) > 20
    found = sorted(
        name
        for name, secret in secrets.items()
        for form in _forms(secret)
        if any(form in v for v in values)
    )
    assert [] == found
