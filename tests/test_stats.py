"""``sealstream stats``: shards, pending work, dead letters, sessions, replies; no key."""

from __future__ import annotations

import signal
import sys

import anyio
import pytest
import redis.asyncio as aioredis

from tests.cli import base_env, redis_env, sealstream, sealstream_json
from tests.helpers import Raw
from tests.terminal import run_python_on_terminal
from worker.demo_app import app
from worker.keyspace import GROUP
from worker.settings import Settings
from worker.testing import RedisServer, ThrowawayKeys, running_worker


async def _scene(settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis) -> Raw:
    """Two sessions, two answered requests, one dead letter, then (no worker running)
    one entry held by a consumer that never acknowledges and two unread entries."""
    raw = Raw(redis, settings.prefix, keys)
    grants = [await raw.grant(), await raw.grant()]
    async with running_worker(app, settings, keys):
        for grant in grants:
            out = raw.seal(grant, {"hi": 1})
            await raw.send(out.request)
            await raw.reply(grant.sid, out.request.mid)
        await raw.send_fields({"x": b"garbage"})
        await raw.wait_dead_letters(1)
        await raw.wait_drained()
    for _ in range(3):
        await raw.send(raw.seal(grants[0], {}).request)
    stream = raw.names.request_stream(0)
    await redis.xreadgroup(GROUP, "ghost", {stream: ">"}, count=1)
    return raw


async def test_stats_json_reports_every_figure(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """--json gives per shard length, lag, pending, the oldest pending entry and the
    consumers; dead letters by reason; live sessions; reply streams and entries."""
    await _scene(settings, keys, redis)
    doc = await sealstream_json("stats", env=redis_env(settings))
    assert 1 == doc["schema"]
    assert settings.prefix == doc["prefix"]
    (shard,) = doc["shards"]
    assert (0, 2, 1) == (shard["shard"], shard["lag"], shard["pending"])
    assert shard["length"] >= 3
    assert shard["oldest_pending_age_ms"] >= 0
    assert 1 == shard["oldest_pending_deliveries"]
    ghost = [c for c in shard["consumers"] if c["name"] == "ghost"]
    assert [1] == [c["pending"] for c in ghost]
    assert {"total": 1, "by_reason": {"malformed": 1}} == doc["dead_letters"]
    assert 2 == doc["sessions"]["live"]
    assert 2 == doc["sessions"]["by_expiry"]["<1h"]
    assert {"streams": 2, "entries": 2} == doc["replies"]


async def test_stats_table_needs_no_key(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Without any key setting, the table names the shard, the ghost consumer and the
    dead letter reason."""
    await _scene(settings, keys, redis)
    code, out, err = await sealstream("stats", env=redis_env(settings))
    assert 0 == code, err
    assert "ghost" in out
    assert "dead letters: 1 (malformed 1)" in out
    assert "sessions: 2 live" in out


async def test_stats_of_an_empty_prefix(settings: Settings) -> None:
    """A prefix nothing has used yet gives zero shards and zero counts, not an error."""
    doc = await sealstream_json("stats", env=redis_env(settings))
    assert [] == doc["shards"]
    assert 0 == doc["dead_letters"]["total"] == doc["sessions"]["live"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_stats_watch_refreshes_until_interrupted(
    settings: Settings, redis: aioredis.Redis, sig: signal.Signals
) -> None:
    """--watch --json prints a fresh snapshot every interval; SIGINT or SIGTERM ends it
    with exit 0."""
    env = {**base_env(), **redis_env(settings)}
    async with await anyio.open_process(
        [sys.executable, "-m", "worker", "stats", "--watch", "--json", "--interval", "0.2"],
        env=env,
    ) as proc:
        assert proc.stdout is not None
        lines = b""
        with anyio.fail_after(20):
            while lines.count(b"\n") < 3:
                lines += await proc.stdout.receive()
        proc.send_signal(sig)
        with anyio.fail_after(10):
            code = await proc.wait()
    assert 0 == code
    assert 3 <= lines.count(b'"schema": 1')


async def test_stats_bad_interval_is_a_usage_error(settings: Settings) -> None:
    """An --interval that is not a sane number of seconds is refused (exit 2)."""
    code, _, err = await sealstream("stats", "--interval", "0", env=redis_env(settings))
    assert 2 == code
    assert "--interval" in err


async def test_stats_hides_the_redis_password(settings: Settings) -> None:
    """A Redis that refuses the connection is one line without the URL's password."""
    code, _, err = await sealstream(
        "stats", env={"SEALSTREAM_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"}
    )
    assert 1 == code
    assert 1 == len(err.strip().splitlines()), err
    assert "hunter2" not in err and "***@127.0.0.1" in err


async def test_watch_on_a_terminal_redraws_in_place(settings: Settings) -> None:
    """On a terminal, --watch clears the screen before each table (redraw in place);
    piped, it only appends (see the JSON watch test)."""
    env = redis_env(settings)
    # The interrupt is timed from after the imports (slow on a busy machine).
    script = (
        "import signal, threading, os, sys; "
        "sys.argv = ['sealstream', 'stats', '--watch', '--interval', '0.2']; "
        "from worker.cli import main; "
        "threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start(); "
        "sys.exit(main())"
    )
    code, out = await anyio.to_thread.run_sync(lambda: run_python_on_terminal(script, env))
    assert 0 == code
    assert out.count(b"\x1b[H\x1b[2J") >= 2
    assert b"sealstream stats" in out


async def test_watch_rides_out_a_redis_outage(settings: Settings) -> None:
    """--watch against a Redis that stops says so on stderr and keeps refreshing once
    it is back (here: a private server stopped and started again on its port)."""
    server = RedisServer.launch()
    env = {**base_env(), "SEALSTREAM_REDIS_URL": server.url, "SEALSTREAM_PREFIX": settings.prefix}
    try:
        async with await anyio.open_process(
            [sys.executable, "-m", "worker", "stats", "--watch", "--json", "--interval", "0.2"],
            env=env,
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            out = b""
            with anyio.fail_after(20):
                while out.count(b"\n") < 1:
                    out += await proc.stdout.receive()
            server.stop()
            err = b""
            with anyio.fail_after(20):
                while b"redis unavailable" not in err:
                    err += await proc.stderr.receive()
            server = RedisServer.launch(port=server.port)
            seen = out.count(b"\n")
            with anyio.fail_after(20):
                while out.count(b"\n") < seen + 2:
                    out += await proc.stdout.receive()
            proc.send_signal(signal.SIGINT)
            with anyio.fail_after(10):
                assert 0 == await proc.wait()
    finally:
        server.stop()
