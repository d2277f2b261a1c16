"""Sessions seen from Redis: counted by time left, revoked by deleting the sealed record."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tests.cli import redis_env, sealstream, sealstream_json
from tests.helpers import Raw, open_ok, wait_until
from worker import revoke_session
from worker.demo_app import app
from worker.errors import InvalidArgument
from worker.session_admin import bucket_of, count_sessions
from worker.settings import Settings
from worker.testing import ThrowawayKeys, running_worker


async def test_list_counts_sessions_by_time_left(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """`session list --json` counts live records by PTTL bucket; no sid or key is shown."""
    raw = Raw(redis, settings.prefix, keys)
    short = await raw.grant(ttl_s=120)
    await raw.grant(ttl_s=3000)
    await raw.grant(ttl_s=7 * 3600)
    code, out, _ = await sealstream("session", "list", "--json", env=redis_env(settings))
    assert 0 == code
    assert short.sid not in out
    doc = await sealstream_json("session", "list", env=redis_env(settings))
    assert 3 == doc["live"]
    expected = {"<5m": 1, "<1h": 1, "<6h": 0, "<24h": 1, ">=24h": 0, "no_expiry": 0}
    assert expected == doc["by_expiry"]


def test_buckets_edges() -> None:
    """PTTL -1 (no expiry) has its own bucket; -2 (gone) is not counted."""
    assert (None, "no_expiry", "<5m", "<1h", ">=24h") == (
        bucket_of(-2),
        bucket_of(-1),
        bucket_of(0),
        bucket_of(300_000),
        bucket_of(86_400_000),
    )


async def test_revoked_session_gets_session_unknown(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """With a worker running: a request answers ok; after revoke_session the next one
    is refused `session_unknown`, and the record is gone."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        before = raw.seal(grant, {"n": 1})
        await raw.send(before.request)
        assert {"n": 1} == open_ok(await raw.reply(grant.sid, before.request.mid), before)
        assert await revoke_session(redis, grant.sid, prefix=settings.prefix)
        after = raw.seal(grant, {"n": 2})
        await raw.send(after.request)
        reply = await raw.reply(grant.sid, after.request.mid)
    assert ("rejected", "session_unknown") == (reply.status, reply.code)
    assert 0 == (await count_sessions(redis, prefix=settings.prefix)).total
    letters = await raw.dead_letters()
    assert [b"session_invalid"] == [x["reason"] for x in letters]


async def test_requests_waiting_in_a_shard_are_refused_after_revoke(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Requests sent before `session revoke` but not yet read by a worker (a backlog)
    are refused `session_unknown` once the worker gets to them; other sessions' are not."""
    raw = Raw(redis, settings.prefix, keys)
    revoked, kept = await raw.grant(), await raw.grant()
    waiting = [raw.seal(revoked, {"i": i}) for i in range(5)]
    other = raw.seal(kept, {"other": True})
    for out in (*waiting, other):
        await raw.send(out.request)
    code, out_text, err = await sealstream(
        "session", "revoke", revoked.sid, env=redis_env(settings)
    )
    assert 0 == code, err
    assert revoked.sid in out_text
    async with running_worker(app, settings, keys):
        replies = [await raw.reply(revoked.sid, o.request.mid) for o in waiting]
        assert {"other": True} == open_ok(await raw.reply(kept.sid, other.request.mid), other)
    assert {("rejected", "session_unknown")} == {(r.status, r.code) for r in replies}


async def test_revoke_unknown_or_malformed_sid(settings: Settings) -> None:
    """Revoking a sid with no session exits 1; a malformed sid is a one-line usage error."""
    env = redis_env(settings)
    assert 1 == (await sealstream("session", "revoke", "0" * 32, env=env))[0]
    code, _, err = await sealstream("session", "revoke", "nothex", env=env)
    assert 2 == code
    assert 1 == len(err.strip().splitlines()) and "SID" in err


async def test_revoke_session_refuses_a_malformed_sid(redis: aioredis.Redis) -> None:
    """The library call raises InvalidArgument (a ValueError) before touching Redis."""
    with pytest.raises(InvalidArgument):
        await revoke_session(redis, "sealstream:*")


async def test_a_running_handler_still_answers_after_revoke(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Revocation takes effect at the next read of the record: a request whose handler
    is already running when the session is revoked still gets its `ok` reply."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        out = raw.seal(grant, {"ms": 800}, type_="sleep")
        await raw.send(out.request)
        seen = raw.names.seen(grant.sid, out.request.mid)
        await wait_until(lambda: redis.exists(seen), timeout=10, interval=0.01)
        assert await revoke_session(redis, grant.sid, prefix=settings.prefix)
        reply = await raw.reply(grant.sid, out.request.mid)
    assert {"slept": 800} == open_ok(reply, out)
