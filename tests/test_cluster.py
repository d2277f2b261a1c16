"""Redis Cluster: the worker, the client and the CLI on a real 3-primary cluster."""

from __future__ import annotations

from dataclasses import replace

import anyio
import pytest
from redis.asyncio.cluster import RedisCluster

from worker import Client, RemoteError
from worker.cluster import ClusterStore, open_redis
from worker.demo import app
from worker.envelope import ALG_RSA, ALG_SK
from worker.names import Names
from worker.settings import Settings
from worker.testing import ThrowawayKeys, running_worker
from worker.testservers import ClusterServers


@pytest.fixture
def cluster_settings(redis_cluster: ClusterServers, settings: Settings) -> Settings:
    """The test's settings on the session's cluster, with 3 request shards."""
    return replace(settings, redis_url=redis_cluster.url, shards=3)


async def test_plain_url_of_a_node_opens_a_cluster_client(redis_cluster: ClusterServers) -> None:
    """A ``redis://`` URL naming one node gives a cluster client (INFO cluster)."""
    client = await open_redis(redis_cluster.url)
    try:
        assert isinstance(client, RedisCluster)
    finally:
        await client.aclose()


async def test_shards_spread_over_the_primaries(redis_cluster: ClusterServers) -> None:
    """The request shards' hash tags put them on different primaries."""
    names = Names("t")
    owners = {redis_cluster.primary_of(names.request_stream(n)) for n in range(3)}
    assert 2 <= len(owners)


@pytest.mark.parametrize("alg", [ALG_SK, ALG_RSA])
async def test_round_trip_on_a_cluster(
    cluster_settings: Settings, keys: ThrowawayKeys, alg: str
) -> None:
    """Handshake, then echo requests spread over 3 shards, each answered once."""
    async with running_worker(app, cluster_settings, keys):
        async with Client.from_url(
            cluster_settings.redis_url, kid=keys.service.kid, prefix=cluster_settings.prefix
        ) as client:
            assert isinstance(client.store, ClusterStore)
            async with client.session(alg=alg) as session:
                results: dict[int, object] = {}

                async def one(i: int) -> None:
                    results[i] = await session.request("echo", {"i": i}, timeout=20)

                async with anyio.create_task_group() as tg:
                    for i in range(30):
                        tg.start_soon(one, i)
                assert {i: {"i": i} for i in range(30)} == results


async def test_handler_error_on_a_cluster(cluster_settings: Settings, keys: ThrowawayKeys) -> None:
    """A failing handler gets its error reply and a dead letter, across slots."""
    async with running_worker(app, cluster_settings, keys):
        async with Client.from_url(
            cluster_settings.redis_url, kid=keys.service.kid, prefix=cluster_settings.prefix
        ) as client:
            async with client.session() as session:
                with pytest.raises(RemoteError) as err:
                    await session.request("fail", {}, timeout=20)
                assert "handler_error" == err.value.code
            redis = client.store.redis
            letters = await redis.xrange(Names(cluster_settings.prefix).dlq)
            assert [b"handler_error"] == [fields[b"reason"] for _, fields in letters]
