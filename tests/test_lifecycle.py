"""The worker's lifecycle duties: heartbeat, trimming, expiry, shards, burst mode."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests.helpers import Raw, now_ms, open_client, open_ok, wait_until
from worker import App, Worker, runtime
from worker.demo_app import app as demo_app
from worker.errors import ConfigError
from worker.keyspace import GROUP
from worker.sessions import new_session, seal_record
from worker.settings import Settings
from worker.streams import Store
from worker.testing import ThrowawayKeys, running_worker


async def test_long_handler_is_not_reclaimed_and_run_twice(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A handler running far past the claim timeout runs once: its worker keeps it fresh."""
    runs: list[str] = []
    app = App()

    @app.handler("long")
    async def long(payload: Any) -> str:
        runs.append("run")
        await anyio.sleep(2.5)
        return "done"

    # Heartbeats every claim_idle_ms / 3: a reclaim needs two of them late by 2/3 s,
    # which a loaded 2-core machine does not do (at 300 ms, 200 ms late was enough).
    short = replace(settings, claim_idle_ms=1000)
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, short, keys), running_worker(app, short, keys):
        out = raw.seal(grant, {}, type_="long")
        await raw.send(out.request)
        reply = await raw.reply(grant.sid, out.request.mid)
        assert "done" == open_ok(reply, out)
    assert ["run"] == runs


async def test_trimming_keeps_pending_entries_and_drops_acknowledged_ones(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Entries older than the oldest pending one are trimmed; it and later ones stay."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    stream = raw.names.request_stream(0)
    slow_claim = replace(settings, claim_idle_ms=600_000)

    async def serve(n: int) -> None:
        async with running_worker(demo_app, slow_claim, keys):
            outs = [raw.seal(grant, {"i": i}) for i in range(n)]
            for out in outs:
                await raw.send(out.request)
            for out in outs:
                await raw.reply(grant.sid, out.request.mid)

    await serve(10)
    ghost_id = await raw.send(raw.seal(grant, {"ghost": True}).request)
    # Another consumer takes it and never acknowledges (stuck, not dead).
    await redis.xreadgroup(GROUP, "ghost", {stream: ">"}, count=1)
    await serve(5)
    async with running_worker(demo_app, slow_claim, keys):

        async def trimmed() -> bool:
            return bool(await redis.xlen(stream) <= 6)

        await wait_until(trimmed, timeout=10, interval=0.05)
    entries = [entry_id.decode() for entry_id, _ in await redis.xrange(stream)]
    assert 6 == len(entries)
    assert ghost_id == entries[0]
    assert 1 == await raw.pending()


async def test_trimming_empties_a_drained_shard(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Once every entry is acknowledged the shard is trimmed to nothing."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(demo_app, settings, keys):
        outs = [raw.seal(grant, {"i": i}) for i in range(10)]
        for out in outs:
            await raw.send(out.request)
        for out in outs:
            await raw.reply(grant.sid, out.request.mid)

        async def empty() -> bool:
            return not await redis.xlen(raw.names.request_stream(0))

        await wait_until(empty, timeout=10, interval=0.05)


async def test_a_busy_shard_is_trimmed_before_the_next_pass(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard this worker read many entries from is trimmed within about a second,
    not at the next pass (Redis would free a whole interval's entries at once)."""
    # Out of reach while the requests are in flight: a trim then (the check runs every
    # second) would stop at the oldest of them and restart the count, leaving the rest
    # to the next pass, an hour away. Lowered once every reply is in, the count of
    # reads (25, less any the pass at startup missed) is the cue at the next check.
    monkeypatch.setattr(runtime, "_TRIM_AFTER_READ", 1_000_000)
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    stream = raw.names.request_stream(0)
    async with running_worker(demo_app, replace(settings, trim_interval_s=3600), keys):
        outs = [raw.seal(grant, {"i": i}) for i in range(25)]
        for out in outs:
            await raw.send(out.request)
        for out in outs:
            await raw.reply(grant.sid, out.request.mid)
        monkeypatch.setattr(runtime, "_TRIM_AFTER_READ", 20)

        async def empty() -> bool:
            return not await redis.xlen(stream)

        await wait_until(empty, timeout=10, interval=0.05)


async def test_expiry_is_read_from_the_sealed_record(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A session past its sealed expiry is unknown even while its Redis key still lives."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    session = new_session(grant.sid, ks=grant.session_key, now_ms=now_ms() - 7_200_000, ttl_s=60)
    await redis.set(raw.names.session(grant.sid), seal_record(session, keys.master.active), ex=600)
    async with running_worker(demo_app, settings, keys):
        out = raw.seal(grant, {"late": True})
        await raw.send(out.request)
        reply = await raw.reply(grant.sid, out.request.mid)
    assert ("rejected", "session_unknown") == (reply.status, reply.code)
    assert [b"session_invalid"] == [d["reason"] for d in await raw.dead_letters()]


async def test_requests_spread_over_shards_are_all_served(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """With three shards the client spreads requests by mid and the worker serves every shard."""
    sharded = replace(settings, shards=3)
    async with running_worker(demo_app, sharded, keys):
        async with (
            open_client(settings, keys) as c,
            c.session() as session,
        ):
            results = [await session.request("echo", i) for i in range(30)]
    assert list(range(30)) == results
    for shard in range(3):
        info = await redis.xinfo_stream(f"{settings.prefix}:req:{{{shard}}}")
        assert info["entries-added"] > 0


async def test_burst_worker_returns_once_drained(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A burst worker serves what is queued, then returns by itself."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    await redis.xgroup_create(raw.names.request_stream(0), GROUP, id="0", mkstream=True)
    outs = [raw.seal(grant, {"i": i}) for i in range(25)]
    for out in outs:
        await raw.send(out.request)
    worker = Worker(
        demo_app,
        replace(settings, burst=True),
        service_key=keys.service,
        master_keys=keys.master,
    )
    with anyio.fail_after(20):
        await worker.run()
    assert 25 == worker.stats["ok"]
    assert {i for i in range(25)} == {
        open_ok(await raw.reply(grant.sid, o.request.mid), o)["i"] for o in outs
    }


async def test_a_deleted_request_stream_is_recreated_and_served(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """An operator deleting a request stream does not stop the worker: it re-creates the group."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(demo_app, settings, keys):
        first = raw.seal(grant, {"n": 1})
        await raw.send(first.request)
        await raw.reply(grant.sid, first.request.mid)
        await redis.delete(raw.names.request_stream(0))
        await wait_until(lambda: redis.exists(raw.names.request_stream(0)), timeout=10)
        second = raw.seal(grant, {"n": 2})
        await raw.send(second.request)
        assert {"n": 2} == open_ok(await raw.reply(grant.sid, second.request.mid), second)


async def test_lost_config_is_published_again(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """P:config deleted (a Redis restarted empty) is written again within a trim pass,
    so a client pinning only the kid can start."""
    fast = replace(settings, trim_interval_s=0.1)
    async with running_worker(demo_app, fast, keys):
        config = Raw(redis, settings.prefix, keys).names.config
        assert 1 == await redis.delete(config)
        await wait_until(lambda: redis.exists(config), timeout=10)
        async with open_client(settings, keys) as client:
            async with client.session() as session:
                assert [1] == await session.request("echo", [1])


async def test_worker_refuses_a_redis_older_than_7(
    settings: Settings, keys: ThrowawayKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a Redis older than 7.0 the worker refuses to start, naming the setting."""

    async def old_version(self: Store) -> tuple[int, ...]:
        return (6, 2, 14)

    monkeypatch.setattr(Store, "server_version", old_version)
    worker = Worker(demo_app, settings, service_key=keys.service, master_keys=keys.master)
    with pytest.raises(ConfigError, match=r"SEALSTREAM_REDIS_URL: Redis 6\.2\.14 is too old"):
        await worker.run()


async def test_server_version_is_read(settings: Settings, redis: aioredis.Redis) -> None:
    """The Store reads the real server's version (this suite's server is 7 or newer)."""
    from worker.keyspace import Names

    assert (7, 0) <= await Store(redis, Names(settings.prefix)).server_version()


async def test_replay_record_outlives_the_handlers_time_budget(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A handler allowed 2 x 15 min gets a replay record living past that, not 10 min."""
    started, release = anyio.Event(), anyio.Event()
    app = App()

    @app.handler("patient", timeout_s=900, retries=1)
    async def patient(payload: Any) -> str:
        started.set()
        await release.wait()
        return "done"

    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        out = raw.seal(grant, {}, type_="patient")
        await raw.send(out.request)
        with anyio.fail_after(10):
            await started.wait()
        ttl = await redis.pttl(raw.names.seen(grant.sid, out.request.mid))
        release.set()
        assert "done" == open_ok(await raw.reply(grant.sid, out.request.mid), out)
    assert 2 * 900_000 < ttl


async def test_dead_letter_is_not_lost_when_the_reply_step_fails(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A handler_error whose first try cannot write to the dead-letter stream is
    dead-lettered on the redelivery: the reply (which marks the request done) waits."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    await redis.set(raw.names.dlq, "not a stream")  # XADD to it fails with WRONGTYPE
    async with running_worker(demo_app, settings, keys):
        out = raw.seal(grant, {}, type_="fail")
        entry_id = await raw.send(out.request)
        stream = raw.names.request_stream(0)
        # The first try is over once the entry, delivered, is redelivered (it failed)
        # or no longer pending (it was answered without its dead letter).

        async def first_try_over() -> bool:
            (group,) = await redis.xinfo_groups(stream)
            info = await redis.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
            return entry_id == group["last-delivered-id"].decode() and (
                not info or info[0]["times_delivered"] >= 2
            )

        await wait_until(first_try_over, timeout=10)
        await redis.delete(raw.names.dlq)
        reply = await raw.reply(grant.sid, out.request.mid)
        assert "error" == reply.status
        letters = await raw.wait_dead_letters(1)
    assert [b"handler_error"] == [letter["reason"] for letter in letters]
    assert [out.request.mid.encode()] == [letter["mid"] for letter in letters]
    assert ["error"] == [r.status for r in await raw.replies(grant.sid)]


def _gated_app() -> tuple[App, anyio.Event, anyio.Event]:
    started, release = anyio.Event(), anyio.Event()
    app = App()

    @app.handler("gated")
    async def gated(payload: Any) -> str:
        started.set()
        await release.wait()
        return "done"

    return app, started, release


async def test_redelivery_pushes_the_replay_record_expiry_out(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A reclaimed entry whose record was about to expire gets a full lifetime again."""
    app, started, release = _gated_app()
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    out = raw.seal(grant, {}, type_="gated")
    entry_id = await raw.send(out.request)
    seen = raw.names.seen(grant.sid, out.request.mid)
    # A first worker took it, claimed the mid long ago, and died.
    stream = raw.names.request_stream(0)
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, "dead", {stream: ">"}, count=1)
    await redis.set(seen, f"0|{entry_id}", px=5_000)  # shard 0, this entry
    async with running_worker(app, replace(settings, claim_idle_ms=200), keys):
        with anyio.fail_after(10):
            await started.wait()
        ttl = await redis.pttl(seen)
        release.set()
        assert "done" == open_ok(await raw.reply(grant.sid, out.request.mid), out)
    assert 9 * 60_000 < ttl


async def test_reply_is_written_when_the_record_expired_during_the_run(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A replay record gone while the handler ran is set again with the reply: the
    request is answered once, not acknowledged without an answer."""
    app, started, release = _gated_app()
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        out = raw.seal(grant, {}, type_="gated")
        entry_id = await raw.send(out.request)
        with anyio.fail_after(10):
            await started.wait()
        seen = raw.names.seen(grant.sid, out.request.mid)
        assert 1 == await redis.delete(seen)  # as if it expired
        release.set()
        assert "done" == open_ok(await raw.reply(grant.sid, out.request.mid), out)
        await raw.wait_drained()
    assert f"0|{entry_id}|done".encode() == await redis.get(seen)
    assert 0 < await redis.pttl(seen)
    assert ["ok"] == [r.status for r in await raw.replies(grant.sid)]
