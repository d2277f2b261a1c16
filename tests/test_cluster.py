"""Redis Cluster: the worker, the client and the CLI on a real 3-primary cluster."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MovedError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from worker import Client, RemoteError, scripts
from worker.cluster import (
    ClusterStore,
    cluster_client,
    open_redis,
    parse_sentinel_url,
    store_for,
)
from worker.demo_app import app
from worker.errors import ConfigError
from worker.keyspace import Names
from worker.protocol import ALG_RSA, ALG_SK, new_id
from worker.retrier import Retrier, for_now, transient
from worker.settings import Settings
from worker.streams import Claim, ReplyWrite
from worker.testing import RedisServer, ThrowawayKeys, running_worker
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


async def test_cluster_no_keeps_a_plain_client(redis_cluster: ClusterServers) -> None:
    """``SEALSTREAM_CLUSTER=no`` gives a single-server client even on a cluster node."""
    client = await open_redis(redis_cluster.url, cluster="no")
    try:
        assert not isinstance(client, RedisCluster)
    finally:
        await client.aclose()


async def test_a_single_server_url_stays_single(redis_server: RedisServer) -> None:
    """On a server without cluster mode, ``auto`` keeps the plain client."""
    client = await open_redis(redis_server.url)
    try:
        assert not isinstance(client, RedisCluster)
        assert not isinstance(store_for(client, Names("t")), ClusterStore)
    finally:
        await client.aclose()


def test_cluster_setting_is_validated() -> None:
    """``SEALSTREAM_CLUSTER`` is auto, yes or no (any case); anything else is refused."""
    assert "yes" == Settings.from_env({"SEALSTREAM_CLUSTER": "YES"}).cluster
    with pytest.raises(ConfigError, match="SEALSTREAM_CLUSTER"):
        Settings.from_env({"SEALSTREAM_CLUSTER": "maybe"})


def test_sentinel_url_is_parsed() -> None:
    """Hosts, service, password and db come out of a ``redis+sentinel://`` URL."""
    assert (
        [("127.0.0.1", 26379), ("127.0.0.2", 26380)],
        "mymaster",
        "s3cret",
        2,
    ) == parse_sentinel_url("redis+sentinel://:s3cret@127.0.0.1:26379,127.0.0.2:26380/mymaster/2")
    assert ([("h", 1)], "svc", None, 0) == parse_sentinel_url("redis+sentinel://h:1/svc")


@pytest.mark.parametrize(
    "url", ["redis+sentinel://h:1/", "redis+sentinel://h/svc", "redis+sentinel://h:1/svc/x"]
)
def test_bad_sentinel_urls_are_config_errors(url: str) -> None:
    """A Sentinel URL without a service, a port, or with a bad db is refused."""
    with pytest.raises(ConfigError, match="Sentinel URL"):
        parse_sentinel_url(url)


def test_a_sentinel_url_is_an_accepted_setting() -> None:
    """``SEALSTREAM_REDIS_URL`` may be a Sentinel URL."""
    url = "redis+sentinel://127.0.0.1:26379/sealstream"
    assert url == Settings.from_env({"SEALSTREAM_REDIS_URL": url}).redis_url


@pytest.mark.parametrize(
    "exc",
    [
        ClusterDownError("The cluster is down"),
        TryAgainError("Multiple keys request during rehashing of slot"),
        MovedError("3999 127.0.0.1:6381"),
        ReadOnlyError("You can't write against a read only replica."),
        OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    ],
)
def test_cluster_refusals_are_transient(exc: ResponseError) -> None:
    """Errors a cluster, a failover or a full server give for now are waited out, not
    dead-lettered (redis-py strips their code from the text: the class decides)."""
    assert transient(exc)


def test_a_cluster_client_out_of_redirections_is_waited_out() -> None:
    """The cluster client's ``TTL exhausted`` (its MOVED/ASK/TRYAGAIN attempts used up
    while a slot moves) is for now, whether raised or left in a pipeline's results."""
    assert for_now(ClusterError("TTL exhausted."))
    assert not for_now(RedisClusterException("No way to dispatch this command"))


async def test_the_retrier_waits_out_a_cluster_down() -> None:
    """An operation failing with CLUSTERDOWN, then an uncovered slot, is run again."""
    errors: list[Exception] = [ClusterDownError("down"), SlotNotCoveredError("slot 1")]

    async def op() -> str:
        if errors:
            raise errors.pop(0)
        return "done"

    assert "done" == await Retrier(cap_s=0.01)(op)


async def test_the_retrier_raises_a_cluster_client_bug() -> None:
    """A command the cluster client cannot route is a bug: raised, never retried."""

    async def op() -> None:
        raise RedisClusterException("No way to dispatch this command to Redis Cluster")

    with pytest.raises(RedisClusterException):
        await Retrier(cap_s=0.01)(op)


async def test_a_retried_finish_writes_its_dead_letter_once(
    redis_cluster: ClusterServers, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose reply step fails after its dead letter was written, retried, writes
    the dead letter once, the reply once, and acknowledges the entry."""
    client = cluster_client(redis_cluster.url)
    names = Names(prefix)
    store = ClusterStore(client, names)
    try:
        await store.ensure_groups(1)
        await client.xadd(names.request_stream(0), {"e": b"x"})
        (entry,) = await store.read(0, "c", count=1, block_ms=100)
        sid, mid, owner = new_id(), new_id(), f"0|{entry.id}"
        assert [None] == await store.claim([Claim(sid=sid, mid=mid, owner=owner, ttl_ms=60_000)])
        write = ReplyWrite(
            shard=0, entry_id=entry.id, sid=sid, mid=mid, owner=owner,
            entry={"e": b"sealed"}, seen_ttl_ms=60_000,
            letter={"reason": "handler_error", "id": entry.id},
        )  # fmt: skip
        real, dropped = store._scripts, list[str]()

        async def drops_the_first_reply_step(script: str, calls: Any) -> list[Any]:
            if script == scripts.SLOT_FINISH and not dropped:
                dropped.append(script)
                raise RedisConnectionError("connection dropped")
            return await real(script, calls)

        monkeypatch.setattr(store, "_scripts", drops_the_first_reply_step)
        assert [1] == await Retrier(cap_s=0.01)(lambda: store.finish([write]))
        assert (1, 1) == (await client.xlen(names.dlq), await client.xlen(names.reply_stream(sid)))
        assert 0 == (await store.pending(0)).count
        assert f"{owner}|done".encode() == await client.get(names.seen(sid, mid))
    finally:
        await client.aclose()
