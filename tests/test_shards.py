"""Growing the request shards while workers run (``sealstream shards set N``)."""

from __future__ import annotations

import json
from dataclasses import replace

import anyio
import pytest
import redis.asyncio as aioredis

from tests.cli import redis_env, sealstream, sealstream_json
from worker import Client
from worker import client as client_module
from worker.demo_app import app
from worker.errors import ConfigError, InvalidArgument
from worker.keyspace import Names
from worker.settings import Settings
from worker.shards import current_shards, set_shards
from worker.testing import ThrowawayKeys, running_worker
from worker.testservers import ClusterServers


async def test_workers_and_clients_follow_added_shards(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Shards set from 1 to 3 under a running worker: it reads the new shards, the
    client sends to them, and every request is answered."""
    async with running_worker(app, settings, keys) as worker:
        async with Client.from_url(
            settings.redis_url, kid=keys.service.kid, prefix=settings.prefix
        ) as client:
            async with client.session() as session:
                assert {"i": -1} == await session.request("echo", {"i": -1})
                assert 1 == await set_shards(redis, 3, prefix=settings.prefix)
                with anyio.fail_after(10):
                    while worker.shards != 3:
                        await anyio.sleep(0.05)
                assert 3 == await client.refresh_shards()
                names = Names(settings.prefix)
                used: set[int] = set()
                for i in range(30):
                    mid = await session.submit("echo", {"i": i}, timeout=10)
                    used.add(names.default_shard(mid, 3))
                got = set()
                async for result in session.replies():
                    got.add(result.unwrap()["i"])
                    if len(got) == 30:
                        break
                assert set(range(30)) == got
                assert {0, 1, 2} == used


async def test_a_restarted_worker_keeps_the_grown_count(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A worker configured with fewer shards than ``P:config`` reads them all and
    never publishes a smaller count."""
    await set_shards(redis, 4, prefix=settings.prefix)
    async with running_worker(app, replace(settings, shards=2), keys) as worker:
        assert 4 == worker.shards
    assert 4 == await current_shards(redis, prefix=settings.prefix)


async def test_shrinking_below_a_shard_with_entries_is_refused(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Lowering shards past a shard that holds entries fails and changes nothing."""
    await set_shards(redis, 3, prefix=settings.prefix)
    await redis.xadd(Names(settings.prefix).request_stream(2), {"e": b"x"})
    with pytest.raises(InvalidArgument, match="shard 2"):
        await set_shards(redis, 1, prefix=settings.prefix)
    assert 3 == await current_shards(redis, prefix=settings.prefix)


async def test_shrinking_past_empty_shards_is_allowed(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Shards that hold nothing may be given up."""
    await set_shards(redis, 3, prefix=settings.prefix)
    assert 3 == await set_shards(redis, 2, prefix=settings.prefix)
    assert 2 == await current_shards(redis, prefix=settings.prefix)


async def test_cli_sets_shards(settings: Settings) -> None:
    """``sealstream shards set N --json`` reports the old and new count."""
    doc = await sealstream_json("shards", "set", "5", env=redis_env(settings))
    assert {"shards": 5, "before": 1} == doc


async def test_cli_refuses_shrinking_in_one_line(settings: Settings, redis: aioredis.Redis) -> None:
    """A refused shrink exits 2 with the reason on stderr."""
    await set_shards(redis, 2, prefix=settings.prefix)
    await redis.xadd(Names(settings.prefix).request_stream(1), {"e": b"x"})
    code, _, err = await sealstream("shards", "set", "1", env=redis_env(settings))
    assert 2 == code
    assert "still holds 1 entries" in err


async def test_cli_commands_on_a_cluster(
    redis_cluster: ClusterServers, settings: Settings, keys: ThrowawayKeys
) -> None:
    """``shards set``, ``send``, ``stats``, ``session list``, ``keys status`` and
    ``dlq stats`` work given a cluster node's plain URL."""
    on_cluster = replace(settings, redis_url=redis_cluster.url)
    env = redis_env(on_cluster)
    assert {"shards": 3, "before": 1} == await sealstream_json("shards", "set", "3", env=env)
    async with running_worker(app, on_cluster, keys):
        code, out, err = await sealstream(
            "send", "echo", '{"a": 1}', env={**env, "SEALSTREAM_KID": keys.service.kid}
        )
        assert (0, {"a": 1}) == (code, json.loads(out)), err
    stats = await sealstream_json("stats", env=env)
    assert 3 == len(stats["shards"])
    sessions = await sealstream_json("session", "list", env=env)
    assert 1 == sessions["live"]
    assert 1 == (await sealstream_json("keys", "status", env=env))["live"]
    assert isinstance(await sealstream_json("dlq", "stats", env=env), dict)


async def test_a_client_keeps_its_count_when_a_refresh_fails(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh that reads a bad ``shards`` keeps the count the client had (its sends go
    on); asking for a refresh outright raises the ConfigError."""
    monkeypatch.setattr(client_module, "SHARDS_REFRESH_S", 0.0)
    await set_shards(redis, 2, prefix=settings.prefix)
    client = Client(redis, kid=keys.service.kid, prefix=settings.prefix)
    assert 2 == await client.shards()
    await redis.hset(Names(settings.prefix).config, "shards", "many")
    assert 2 == await client.shards()
    with pytest.raises(ConfigError, match="P:config shards"):
        await client.refresh_shards()
