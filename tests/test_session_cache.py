"""Opened sessions are cached by sid: later requests are served without reading the
record, and a record gone from Redis (revoked, expired) still ends the session at once.

The CLAIM script sets a request's replay record only while its session record has the
digest the worker opened (a tampered record after use: ``test_rejections``); a request
refused with a cached session (authentication, the key size, its sealed expiry) has its
record read again, so a revoked session answers ``session_unknown`` before the rest, as
the protocol orders, and a sid given a new session is served by it. A forgery for a live
cached session costs one unwrap, as without the cache; a key reload empties the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.cluster import key_slot

from tests.helpers import ALG_RSA, ALG_SK, Raw, handshake, open_ok
from worker import create_session, envelopes, revoke_session, wire
from worker.cluster import open_redis, store_for
from worker.demo_app import app
from worker.handshake import SessionGrant
from worker.keys import MasterKey, MasterKeys
from worker.keyspace import Names
from worker.protocol import new_id, now_ms
from worker.rotation import compare_and_set
from worker.sessions import open_record, seal_record
from worker.settings import Settings
from worker.streams import Claim
from worker.testing import ThrowawayKeys, running_worker

pytestmark = pytest.mark.anyio


async def _mgets(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


async def _served(raw: Raw, grant: SessionGrant, *, alg: str = ALG_SK) -> None:
    """One request of ``grant``'s session answered ``ok`` (its session is now cached)."""
    out = raw.seal(grant, {"n": 0}, alg=alg)
    await raw.send(out.request)
    assert {"n": 0} == open_ok(await raw.reply(grant.sid, out.request.mid), out)


async def test_later_requests_of_a_session_do_not_read_its_record(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """After a session's first request, ten more are answered with no MGET of records."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        await _served(raw, grant)
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
        await _served(raw, grant, alg=alg)
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
        await _served(raw, grant, alg=alg)
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
        await _served(raw, grant)
        await redis.delete(raw.names.session(grant.sid))  # what an expiry leaves
        late = raw.seal(grant, {"n": 1})
        await raw.send(late.request)
        reply = await raw.reply(grant.sid, late.request.mid)
    assert ("rejected", "session_unknown") == (reply.status, reply.code)
    assert await redis.get(raw.names.seen(grant.sid, late.request.mid)) is None


async def test_a_wrong_size_key_for_a_revoked_cached_session_is_session_unknown(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """The session is checked before the ``encryptedAesKey`` size: for a revoked cached
    session a wrong-size key is ``session_unknown`` (dead letter ``session_invalid``),
    not a ``malformed`` refusal."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        await _served(raw, grant, alg=ALG_RSA)
        assert await revoke_session(redis, grant.sid, prefix=settings.prefix)
        out = raw.seal(grant, {"n": 1}, alg=ALG_RSA)
        wrong = dataclasses.replace(out.request, encrypted_aes_key=bytes(100))
        entry_id = await raw.send(wrong)
        reply = await raw.reply(grant.sid, out.request.mid)
        letter = await raw.letter_for(entry_id)
    assert ("rejected", "session_unknown") == (reply.status, reply.code)
    assert b"session_invalid" == letter["reason"]


async def test_a_sid_given_a_new_session_with_another_key_size_is_served(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A sid revoked and given a new session (a trusted back end may choose the sid) with
    a 3072-bit key: its requests are answered, though the old 2048-bit session is
    cached."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        await _served(raw, grant, alg=ALG_RSA)
        assert await revoke_session(redis, grant.sid, prefix=settings.prefix)
        again = await create_session(
            redis, keys.master, prefix=settings.prefix, sid=grant.sid, bits=3072
        )
        await _served(raw, again, alg=ALG_RSA)


async def test_a_sid_given_a_new_session_after_its_cached_one_expired_is_served(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A cached session past its sealed expiry, its sid then given a new session: the
    new session's requests are answered (the record is read again, not refused from
    the cache)."""
    offset = [0]

    def clock() -> int:
        return now_ms() + offset[0]

    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant(ttl_s=60)
    async with running_worker(app, settings, keys, clock=clock):
        await _served(raw, grant)
        offset[0] = 120_000  # the cached session is over by the worker's clock
        assert await revoke_session(redis, grant.sid, prefix=settings.prefix)
        again = await create_session(
            redis, keys.master, prefix=settings.prefix, sid=grant.sid, ttl_s=3600
        )
        out = raw.seal(again, {"n": 1}, ts=clock())
        await raw.send(out.request)
        assert {"n": 1} == open_ok(await raw.reply(again.sid, out.request.mid), out)


@pytest.mark.parametrize("alg", [ALG_SK, ALG_RSA])
async def test_a_forged_request_for_a_live_cached_session_is_opened_once(
    settings: Settings,
    keys: ThrowawayKeys,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    alg: str,
) -> None:
    """A forged request for a live cached session costs one unwrap or tag check, as
    without the cache: reading its unchanged record again does not repeat the crypto
    (a hostile producer cannot double the RSA work)."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    opens: list[str] = []
    real = envelopes.open_request

    def counted(request: wire.Request, **options: Any) -> envelopes.Opened:
        opens.append(request.mid)
        return real(request, **options)

    monkeypatch.setattr(envelopes, "open_request", counted)
    async with running_worker(app, settings, keys):
        await _served(raw, grant, alg=alg)
        forged = raw.seal(grant, {"n": 1}, alg=alg)
        entry_id = await raw.send(dataclasses.replace(forged.request, auth_tag=bytes(16)))
        letter = await raw.letter_for(entry_id)
    assert b"auth_failed" == letter["reason"]
    assert [forged.request.mid] == [m for m in opens if m == forged.request.mid]


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


async def _send_at_once(raw: Raw, requests: list[wire.Request]) -> list[str]:
    """XADD ``requests`` to shard 0 in one script step, so one read takes them all."""
    args: list[Any] = []
    for request in requests:
        ((field, value),) = wire.encode_request(request).items()
        args += (field, value)
    script = """
    local ids = {}
    for i = 1, #ARGV, 2 do
      ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', ARGV[i], ARGV[i + 1])
    end
    return ids
    """
    ids = await raw.redis.eval(script, 1, raw.names.request_stream(0), *args)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


async def test_a_mixed_batch_of_cached_sessions_gets_the_uncached_answers(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """One batch: a live cached session's genuine and forged requests, a revoked cached
    session's genuine and forged requests in both algorithms, and a handshake (its claim
    names no session). Each gets the answer it gets with no cache: ``ok``,
    ``auth_failed``, ``session_unknown`` for all of the revoked one's, and the handshake
    its session."""
    raw = Raw(redis, settings.prefix, keys)
    live, gone = await raw.grant(), await raw.grant()
    async with running_worker(app, settings, keys):
        await _served(raw, live)
        await _served(raw, gone, alg=ALG_RSA)
        assert await revoke_session(redis, gone.sid, prefix=settings.prefix)
        ok = raw.seal(live, {"n": 1})
        forged = raw.seal(live, {"n": 2}, alg=ALG_RSA)
        revoked = [raw.seal(gone, {"n": n}, alg=alg) for n, alg in enumerate([ALG_SK, ALG_RSA])]
        revoked_forged = [
            raw.seal(gone, {"n": n}, alg=alg) for n, alg in enumerate([ALG_SK, ALG_RSA], 2)
        ]
        hello = handshake(keys)
        ids = await _send_at_once(
            raw,
            [
                ok.request,
                dataclasses.replace(forged.request, auth_tag=bytes(16)),
                *(out.request for out in revoked),
                *(dataclasses.replace(out.request, auth_tag=bytes(16)) for out in revoked_forged),
                hello.request,
            ],
        )
        assert {"n": 1} == open_ok(await raw.reply(live.sid, ok.request.mid), ok)
        gone_replies = [
            await raw.reply(gone.sid, out.request.mid) for out in (*revoked, *revoked_forged)
        ]
        hello_reply = await raw.reply(hello.request.sid, hello.request.mid)
        letters = [(await raw.letter_for(i))["reason"] for i in ids[1:6]]
    assert [("rejected", "session_unknown")] * 4 == [(r.status, r.code) for r in gone_replies]
    assert [b"auth_failed", *[b"session_invalid"] * 4] == letters
    assert "ok" == hello_reply.status
    assert await redis.get(raw.names.session(hello.request.sid)) is not None


@pytest.mark.parametrize("alg", [ALG_SK, ALG_RSA])
async def test_a_cached_session_whose_record_is_resealed_serves_on(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, alg: str
) -> None:
    """A cached session's record re-sealed under another KEK of the ring (a rotation):
    the claim finds the record changed, the record is read again and opened, and the
    request is answered (no ``session_unknown``); the next one from the cache again."""
    older = MasterKey.generate()
    ring = ThrowawayKeys(service=keys.service, master=MasterKeys(keys.master.active, [older]))
    raw = Raw(redis, settings.prefix, ring)
    grant = await raw.grant()
    async with running_worker(app, settings, ring):
        await _served(raw, grant, alg=alg)
        key = raw.names.session(grant.sid)
        before = await raw.get(key)
        assert before is not None
        after = seal_record(open_record(grant.sid, before, ring.master), older)
        assert await compare_and_set(redis, key, before, after)
        mgets = await _mgets(redis)
        for n in (1, 2):
            out = raw.seal(grant, {"n": n}, alg=alg)
            await raw.send(out.request)
            assert {"n": n} == open_ok(await raw.reply(grant.sid, out.request.mid), out)
        assert mgets + 1 == await _mgets(redis)  # read once, then cached again


@pytest.mark.parametrize("on", ["server", "cluster"])
async def test_claims_name_their_session_digest_and_a_retried_call_answers_alike(
    request: pytest.FixtureRequest, prefix: str, on: str
) -> None:
    """CLAIM over sids in several slots: a claim whose session record has the digest it
    names, or that names none (a handshake), is set; one naming another digest, or whose
    record is gone, answers ``"?"`` and sets nothing. The same call again (a retry after
    a lost answer) finds its own owners (redeliveries) and the same ``"?"``."""
    url = request.getfixturevalue("redis_server" if on == "server" else "redis_cluster").url
    client = await open_redis(url)
    names = Names(prefix)
    store = store_for(client, names)
    try:
        record = b"sealed record"
        digest = hashlib.sha1(record, usedforsecurity=False).hexdigest()
        live, changed, gone, hello = (new_id() for _ in range(4))
        for sid in (live, changed):
            await client.set(names.session(sid), record)
        await client.set(names.session(changed), record + b"!")
        claims = [
            Claim(sid=live, mid=new_id(), owner="0|1-0", ttl_ms=60_000, session_digest=digest),
            Claim(sid=changed, mid=new_id(), owner="0|1-1", ttl_ms=60_000, session_digest=digest),
            Claim(sid=gone, mid=new_id(), owner="0|1-2", ttl_ms=60_000, session_digest=digest),
            Claim(sid=hello, mid=new_id(), owner="0|1-3", ttl_ms=60_000),
        ]
        assert 2 <= len({key_slot(names.seen(c.sid, c.mid).encode()) for c in claims})
        assert [None, "?", "?", None] == await store.claim(claims)
        assert ["0|1-0", "?", "?", "0|1-3"] == await store.claim(claims)
        assert [None, None] == [await client.get(names.seen(c.sid, c.mid)) for c in claims[1:3]]
    finally:
        await client.aclose()
