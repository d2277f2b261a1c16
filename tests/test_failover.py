"""Failover on real servers: a primary SIGKILLed mid-run, its replica promoted.

Requests flow through an in-process worker while the primary that holds a request
shard (cluster) or everything (Sentinel) is killed. Every request must end with
exactly one ``ok`` result at the client, and no handler may run twice.

Redis replicates asynchronously: a write the killed primary acknowledged in its
last instant may not have reached the replica. On loopback the replica is at most
a few microseconds behind, so the tests expect no loss; a loss here would show as
a missing reply (a request entry lost) or a second handler call (a replay record
or XACK lost), which is what the assertions count.
"""

from __future__ import annotations

import gc
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import anyio
import pytest

from worker import App, Client, Result
from worker.keyspace import Names
from worker.settings import Settings
from worker.testing import ThrowawayKeys, running_worker
from worker.testservers import ClusterServers, SentinelServers

pytestmark = pytest.mark.slow
REQUESTS = 300


@pytest.fixture(autouse=True)
def _dropped_node_connections() -> Iterator[None]:
    """Collect what redis-py's cluster client leaves behind after a failover.

    redis-py 8.1 drops the connections of a node it removes from its cache (the dead
    primary) and of nodes it rebuilds on a topology refresh without closing them all;
    once the clients are closed those sockets are garbage. Collect them here, with
    their ResourceWarnings ignored, so they are not reported in another test.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def counting_app(calls: Counter[int]) -> App:
    """An echo app that counts its calls by the payload's ``i``."""
    app = App(timeout_s=10)

    @app.handler("echo")
    async def echo(payload: Any) -> Any:
        calls[payload["i"]] += 1
        return payload

    return app


async def _run(settings: Settings, keys: ThrowawayKeys, fail_over: Callable[[], None]) -> None:
    """Send REQUESTS echoes over ~3 s, calling ``fail_over`` (in a thread) a third of
    the way in; check one ok result per request and one handler call each."""
    calls: Counter[int] = Counter()
    # By mid: a reply may be taken before submit() returns its mid (a send retried
    # through the failover, whose first try was applied and answered meanwhile).
    results: dict[str, list[Result]] = {}
    mids: dict[str, int] = {}
    third = anyio.Event()
    async with running_worker(counting_app(calls), settings, keys):
        async with Client.from_url(
            settings.redis_url, kid=keys.service.kid, prefix=settings.prefix
        ) as client:
            async with client.session(max_in_flight=REQUESTS) as session:

                async def collect() -> None:
                    async for result in session.replies():
                        results.setdefault(result.mid, []).append(result)
                        if len(results) == REQUESTS:
                            return

                with anyio.fail_after(90):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(collect)
                        tg.start_soon(_in_thread_after, third, fail_over)
                        for i in range(REQUESTS):
                            mid = await session.submit("echo", {"i": i}, timeout=60)
                            mids[mid] = i
                            if i == REQUESTS // 3:
                                third.set()
                            await anyio.sleep(0.01)
    assert {i: ["ok"] for i in range(REQUESTS)} == {
        mids[mid]: [r.status for r in rs] for mid, rs in results.items()
    }
    assert {i: 1 for i in range(REQUESTS)} == dict(calls)


async def _in_thread_after(event: anyio.Event, action: Callable[[], None]) -> None:
    await event.wait()
    await anyio.to_thread.run_sync(action)


async def test_cluster_primary_killed_mid_run(settings: Settings, keys: ThrowawayKeys) -> None:
    """A cluster primary holding a request shard dies mid-run: nothing lost or run twice."""
    with ClusterServers.start(primaries=3, replicas=1) as cluster:
        on_cluster = replace(settings, redis_url=cluster.url, shards=3)
        shard0 = Names(settings.prefix).request_stream(0)

        def fail_over() -> None:
            dead = cluster.kill_primary_of(shard0)
            cluster.wait_promoted(shard0, dead)

        await _run(on_cluster, keys, fail_over)


async def test_sentinel_primary_killed_mid_run(settings: Settings, keys: ThrowawayKeys) -> None:
    """The Sentinel-watched primary dies mid-run: clients and workers follow the
    promoted replica; nothing is lost or run twice."""
    with SentinelServers.start() as deployment:
        on_sentinel = replace(settings, redis_url=deployment.url, shards=2)

        def fail_over() -> None:
            deployment.kill_primary()
            deployment.wait_promoted()

        await _run(on_sentinel, keys, fail_over)
