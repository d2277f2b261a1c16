"""Opened sessions are cached by sid: later requests are served without reading the
record, and a record gone from Redis (revoked, expired) still ends the session at once.

The CLAIM script sets a request's replay record only while its session record has the
digest the worker opened (a tampered record after use: ``test_rejections``); a request
that fails to open with a cached session has its record read again, so a revoked
session answers ``session_unknown`` before authentication, as the protocol orders.
"""

from __future__ import annotations

import dataclasses

import pytest
import redis.asyncio as aioredis

from tests.helpers import ALG_RSA, ALG_SK, Raw, open_ok
from worker import revoke_session
from worker.demo_app import app
from worker.handshake import SessionGrant
from worker.keys import MasterKey, MasterKeys
from worker.settings import Settings
from worker.testing import ThrowawayKeys, running_worker

pytestmark = pytest.mark.anyio


async def _mgets(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


async def test_later_requests_of_a_session_do_not_read_its_record(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """After a session's first request, ten more are answered with no MGET of records."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        first = raw.seal(grant, {"n": 0})
        await raw.send(first.request)
        assert {"n": 0} == open_ok(await raw.reply(grant.sid, first.request.mid), first)
        before = await _mgets(redis)
        for n in range(1, 11):
            out = raw.seal(grant, {"n": n})
            await raw.send(out.request)
            assert {"n": n} == open_ok(await raw.reply(grant.sid, out.request.mid), out)
        assert before == await _mgets(redis)


@pytest.mark.parametrize("alg", [ALG_SK, ALG_RSA])
async def test_a_forged_request_for_a_revoked_cached_session_is_session_unknown(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, alg: str
) -> None:
    """A session served once (cached), then revoked: a request with a wrong tag is
    refused ``session_unknown`` (the session check comes before authentication), and
    a genuine one too."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        first = raw.seal(grant, {"n": 0}, alg=alg)
        await raw.send(first.request)
        assert "ok" == (await raw.reply(grant.sid, first.request.mid)).status
        assert await revoke_session(redis, grant.sid, prefix=settings.prefix)
        forged = raw.seal(grant, {"n": 1}, alg=alg)
        await raw.send(dataclasses.replace(forged.request, auth_tag=bytes(16)))
        genuine = raw.seal(grant, {"n": 2}, alg=alg)
        await raw.send(genuine.request)
        replies = [
            await raw.reply(grant.sid, forged.request.mid),
            await raw.reply(grant.sid, genuine.request.mid),
        ]
    assert [("rejected", "session_unknown")] * 2 == [(r.status, r.code) for r in replies]


@pytest.mark.parametrize("alg", [ALG_SK, ALG_RSA])
async def test_a_forged_request_for_a_live_cached_session_is_auth_failed(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, alg: str
) -> None:
    """A wrong tag for a live, cached session is ``auth_failed`` (a plain ``rejected``
    notice and an ``auth_failed`` dead letter); the session serves on."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        first = raw.seal(grant, {"n": 0}, alg=alg)
        await raw.send(first.request)
        assert "ok" == (await raw.reply(grant.sid, first.request.mid)).status
        forged = raw.seal(grant, {"n": 1}, alg=alg)
        forged_id = await raw.send(dataclasses.replace(forged.request, auth_tag=bytes(16)))
        reply = await raw.reply(grant.sid, forged.request.mid)
        assert ("rejected", "rejected") == (reply.status, reply.code)
        letter = await raw.letter_for(forged_id)
        after = raw.seal(grant, {"n": 2}, alg=alg)
        await raw.send(after.request)
        assert {"n": 2} == open_ok(await raw.reply(grant.sid, after.request.mid), after)
    assert b"auth_failed" == letter["reason"]


async def test_a_cached_session_whose_record_expired_in_redis_is_session_unknown(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """The record's key expiring in Redis ends a cached session: ``session_unknown``,
    and the handler does not run (no replay record is set)."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        first = raw.seal(grant, {"n": 0})
        await raw.send(first.request)
        assert "ok" == (await raw.reply(grant.sid, first.request.mid)).status
        await redis.delete(raw.names.session(grant.sid))  # what an expiry leaves
        late = raw.seal(grant, {"n": 1})
        await raw.send(late.request)
        reply = await raw.reply(grant.sid, late.request.mid)
    assert ("rejected", "session_unknown") == (reply.status, reply.code)
    assert await redis.get(raw.names.seen(grant.sid, late.request.mid)) is None


async def _served(raw: Raw, grant: SessionGrant, *, alg: str = ALG_SK) -> None:
    """One request of ``grant``'s session answered ``ok`` (its session is now cached)."""
    out = raw.seal(grant, {"n": 0}, alg=alg)
    await raw.send(out.request)
    assert {"n": 0} == open_ok(await raw.reply(grant.sid, out.request.mid), out)


async def test_a_master_key_dropped_on_reload_ends_its_cached_sessions(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """After a reload whose ring no longer holds the KEK a record was sealed under, the
    record fails to open: a session cached before the reload is ``session_unknown``
    (dead letter ``session_invalid``), as after a restart."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys) as worker:
        await _served(raw, grant)
        await worker.reload_keys(keys.service, MasterKeys(MasterKey.generate()))
        out = raw.seal(grant, {"n": 1})
        entry_id = await raw.send(out.request)
        reply = await raw.reply(grant.sid, out.request.mid)
        letter = await raw.letter_for(entry_id)
    assert ("rejected", "session_unknown") == (reply.status, reply.code)
    assert b"session_invalid" == letter["reason"]
