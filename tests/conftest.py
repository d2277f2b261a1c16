"""Shared fixtures: one real redis-server per test session, a unique prefix per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import hypothesis
import pytest
import redis.asyncio as aioredis

from worker.settings import Settings
from worker.streams import connect
from worker.testing import RedisServer, ThrowawayKeys
from worker.testservers import ClusterServers

# Timing is measured by scripts/bench, never asserted: no per-example deadline, which
# would only flake on a loaded 2-core CI machine.
hypothesis.settings.register_profile("sealstream", deadline=None, print_blob=True)
hypothesis.settings.load_profile("sealstream")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port for the whole test session."""
    server = RedisServer.launch()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterServers]:
    """A Redis Cluster of 3 primaries with a replica each, for the whole test session.

    Fault tests kill primaries: they wait for the replica's promotion, so the
    cluster stays whole (3 primaries) for the tests after them.
    """
    cluster = ClusterServers.launch(primaries=3, replicas=1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def keys() -> ThrowawayKeys:
    """One service key pair and master key for the session (RSA keygen is slow)."""
    return ThrowawayKeys.generate()


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses."""
    return f"t{os.urandom(6).hex()}"


@pytest.fixture
def settings(redis_server: RedisServer, prefix: str) -> Settings:
    """Worker settings for tests: short timeouts, the test's Redis and prefix."""
    return Settings(
        redis_url=redis_server.url,
        prefix=prefix,
        concurrency=16,
        claim_idle_ms=1000,
        grace_s=5.0,
        handler_timeout_s=5.0,
        trim_interval_s=0.5,
        log_level="warning",
        # Handshake tests wait for key generation; at the default (idle) priority a
        # busy CI runner would starve it. tests/test_keypool.py checks idle itself.
        handshake_priority="low",
        # A small key pool: a test's worker makes these four once it has been quiet
        # for a second (tests/test_keypool_fill.py checks the rules).
        handshake_pool=4,
    )


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the test session's Redis."""
    client = connect(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()
