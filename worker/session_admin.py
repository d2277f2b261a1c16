"""Live sessions, seen from what Redis holds in clear: count them, bucket them, revoke one.

Nothing here needs a master key or opens a record: key names, ``PTTL`` and the
record's clear ``kek`` field are enough. Revoking deletes the sealed record; the
worker reads the record from Redis for every request, so the session's next
request (and any still waiting in a shard) is refused ``session_unknown``. A
request whose handler is already running when the record goes still gets its
reply: revocation takes effect at the next read of the record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from worker.errors import InvalidArgument
from worker.keyspace import Names
from worker.streams import AnyRedis
from worker.wire import is_id

#: Expiry buckets of ``session list``: (upper bound in ms, label), then ``>=24h``.
BUCKETS: tuple[tuple[int, str], ...] = (
    (5 * 60_000, "<5m"),
    (3_600_000, "<1h"),
    (6 * 3_600_000, "<6h"),
    (24 * 3_600_000, "<24h"),
)
LAST_BUCKET = ">=24h"
NO_EXPIRY = "no_expiry"
BUCKET_LABELS = (*(label for _, label in BUCKETS), LAST_BUCKET, NO_EXPIRY)
_BATCH = 500


class SessionCounts(NamedTuple):
    """Live session records, in all and by time left (``PTTL``) bucket."""

    total: int
    by_expiry: dict[str, int]


async def scan_keys(redis: AnyRedis, pattern: str, *, count: int = 1000) -> AsyncIterator[str]:
    """Every key matching ``pattern`` (SCAN: never blocks Redis; a key may repeat).

    On a Redis Cluster every primary is scanned in turn.
    """
    if isinstance(redis, RedisCluster):
        async for key in redis.scan_iter(match=pattern, count=count):
            yield key.decode() if isinstance(key, bytes) else str(key)
        return
    cursor = 0
    while True:
        cursor, keys = await redis.scan(cursor, match=pattern, count=count)
        for key in keys:
            yield key.decode() if isinstance(key, bytes) else str(key)
        if int(cursor) == 0:
            return


async def session_keys(redis: aioredis.Redis, names: Names) -> AsyncIterator[list[str]]:
    """Session record keys in batches of up to 500, each key once."""
    seen: set[str] = set()
    batch: list[str] = []
    async for key in scan_keys(redis, names.session_pattern):
        if key in seen or names.sid_of_session_key(key) is None:
            continue
        seen.add(key)
        batch.append(key)
        if len(batch) >= _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def bucket_of(pttl_ms: int) -> str | None:
    """The expiry bucket of a ``PTTL`` reply; None for a key that is gone (-2)."""
    if pttl_ms == -2:
        return None
    if pttl_ms < 0:
        return NO_EXPIRY
    for bound, label in BUCKETS:
        if pttl_ms < bound:
            return label
    return LAST_BUCKET


async def count_sessions(redis: aioredis.Redis, *, prefix: str = "sealstream") -> SessionCounts:
    """Count live session records by time left; opens nothing."""
    names = Names(prefix)
    counts: Counter[str] = Counter({label: 0 for label in BUCKET_LABELS})
    async for batch in session_keys(redis, names):
        async with redis.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.pttl(key)
            ttls: list[Any] = await pipe.execute()
        for ttl in ttls:
            label = bucket_of(int(ttl))
            if label is not None:
                counts[label] += 1
    by_expiry = {label: counts[label] for label in BUCKET_LABELS}
    return SessionCounts(total=sum(by_expiry.values()), by_expiry=by_expiry)


def check_sid(sid: str) -> str:
    """``sid`` if it is 32 lowercase hex chars; :class:`InvalidArgument` otherwise."""
    if not is_id(sid):
        raise InvalidArgument("SID: expected 32 lowercase hex characters")
    return sid


async def revoke_session(redis: aioredis.Redis, sid: str, *, prefix: str = "sealstream") -> bool:
    """Delete ``sid``'s sealed session record; True if there was one.

    Later requests of the session (and those still waiting in a shard) are refused
    ``session_unknown``; a handler already running finishes and replies. Raises
    :class:`InvalidArgument` for a malformed ``sid`` (nothing is deleted).
    """
    key = Names(prefix).session(check_sid(sid))
    return bool(await redis.delete(key))
