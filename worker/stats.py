"""``sealstream stats``: what a deployment is doing, from what Redis holds in clear.

Per shard: length, lag (entries not yet delivered to the group), pending entries,
the oldest pending entry's age and idle time, and each consumer's idle time; dead
letters by reason; live sessions by time left; reply streams and their entries.
Needs no key: it reads key names, stream metadata, TTLs and dead-letter reasons.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from worker.dlq import ReasonCounts, count_letters, server_time_ms
from worker.keyspace import GROUP, Names
from worker.session_admin import SessionCounts, count_sessions, scan_keys

#: Version of the ``--json`` schema (README, "Operations"); bumped on any change
#: that is not a pure addition.
SCHEMA = 1


class ConsumerStats(NamedTuple):
    """A consumer of a shard's group: entries it holds and how long it has been idle."""

    name: str
    pending: int
    idle_ms: int


class ShardStats(NamedTuple):
    """One request shard ``P:req:{n}``."""

    shard: int
    stream: str
    length: int
    lag: int | None
    pending: int
    oldest_pending_id: str | None
    oldest_pending_age_ms: int | None
    oldest_pending_idle_ms: int | None
    oldest_pending_deliveries: int | None
    consumers: list[ConsumerStats]


class ReplyStats(NamedTuple):
    """Reply streams and the replies they keep (clients read without deleting)."""

    streams: int
    entries: int


class Stats(NamedTuple):
    """A snapshot of one prefix's state in Redis."""

    prefix: str
    at_ms: int
    shards: list[ShardStats]
    dead_letters: ReasonCounts
    sessions: SessionCounts
    replies: ReplyStats


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _get(row: dict[Any, Any], name: str) -> Any:
    return row.get(name, row.get(name.encode()))


async def _shard_count(redis: aioredis.Redis, names: Names) -> int:
    """Shards from ``P:config``, else one more than the highest ``P:req:{n}`` found."""
    raw = await redis.hget(names.config, "shards")
    if raw is not None and _s(raw).isdigit():
        return int(_s(raw))
    highest = -1
    async for key in scan_keys(redis, names.request_stream_pattern):
        inner = key.rsplit("{", 1)[-1].rstrip("}")
        if inner.isdigit():
            highest = max(highest, int(inner))
    return highest + 1


async def shard_stats(redis: aioredis.Redis, names: Names, shard: int, now_ms: int) -> ShardStats:
    """One shard's figures (an absent stream or group reads as empty)."""
    stream = names.request_stream(shard)
    length = int(await redis.xlen(stream))
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such key
        groups = []
    group = next((g for g in groups if _s(_get(g, "name")) == GROUP), None)
    if group is None:
        return ShardStats(shard, stream, length, None, 0, None, None, None, None, [])
    lag_raw = _get(group, "lag")
    pending = int(_get(group, "pending"))
    oldest_id = oldest_age = oldest_idle = oldest_deliveries = None
    if pending:
        rows = await redis.xpending_range(stream, GROUP, min="-", max="+", count=1)
        if rows:
            oldest_id = _s(rows[0]["message_id"])
            oldest_age = max(0, now_ms - int(oldest_id.split("-")[0]))
            oldest_idle = int(rows[0]["time_since_delivered"])
            oldest_deliveries = int(rows[0]["times_delivered"])
    consumers = [
        ConsumerStats(
            name=_s(_get(c, "name")), pending=int(_get(c, "pending")), idle_ms=int(_get(c, "idle"))
        )
        for c in await redis.xinfo_consumers(stream, GROUP)
    ]
    return ShardStats(
        shard=shard,
        stream=stream,
        length=length,
        lag=int(lag_raw) if lag_raw is not None else None,
        pending=pending,
        oldest_pending_id=oldest_id,
        oldest_pending_age_ms=oldest_age,
        oldest_pending_idle_ms=oldest_idle,
        oldest_pending_deliveries=oldest_deliveries,
        consumers=sorted(consumers, key=lambda c: c.name),
    )


async def reply_stats(redis: aioredis.Redis, names: Names) -> ReplyStats:
    """Count reply streams and their entries (SCAN, then XLEN in pipelines)."""
    keys = {key async for key in scan_keys(redis, names.reply_stream_pattern)}
    entries, ordered = 0, sorted(keys)
    for start in range(0, len(ordered), 500):
        async with redis.pipeline(transaction=False) as pipe:
            for key in ordered[start : start + 500]:
                pipe.xlen(key)
            entries += sum(int(n) for n in await pipe.execute())
    return ReplyStats(streams=len(keys), entries=entries)


async def collect(redis: aioredis.Redis, *, prefix: str = "sealstream") -> Stats:
    """A snapshot of everything ``sealstream stats`` shows."""
    names = Names(prefix)
    now = await server_time_ms(redis)
    shards = [
        await shard_stats(redis, names, n, now) for n in range(await _shard_count(redis, names))
    ]
    return Stats(
        prefix=prefix,
        at_ms=now,
        shards=shards,
        dead_letters=await count_letters(redis, prefix=prefix),
        sessions=await count_sessions(redis, prefix=prefix),
        replies=await reply_stats(redis, names),
    )


def to_json(stats: Stats) -> dict[str, Any]:
    """The ``--json`` document (schema version :data:`SCHEMA`)."""
    return {
        "schema": SCHEMA,
        "prefix": stats.prefix,
        "at_ms": stats.at_ms,
        "shards": [
            {
                **{k: v for k, v in s._asdict().items() if k != "consumers"},
                "consumers": [c._asdict() for c in s.consumers],
            }
            for s in stats.shards
        ],
        "dead_letters": {
            "total": stats.dead_letters.total,
            "by_reason": stats.dead_letters.by_reason,
        },
        "sessions": {"live": stats.sessions.total, "by_expiry": stats.sessions.by_expiry},
        "replies": stats.replies._asdict(),
    }


def duration(ms: int | None) -> str:
    """A short human duration: ``850ms``, ``12.3s``, ``4m05s``, ``2h10m``, ``3d04h``."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def render(stats: Stats) -> str:
    """The human table ``sealstream stats`` prints on a terminal."""
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stats.at_ms / 1000))
    lines = [f"sealstream stats  prefix={stats.prefix}  at {at}", ""]
    shard_rows = [
        [
            str(s.shard),
            str(s.length),
            "-" if s.lag is None else str(s.lag),
            str(s.pending),
            duration(s.oldest_pending_age_ms),
            duration(s.oldest_pending_idle_ms),
            str(len(s.consumers)),
        ]
        for s in stats.shards
    ]
    lines += _table(
        ["shard", "length", "lag", "pending", "oldest pending", "its idle", "consumers"], shard_rows
    )
    consumer_rows = [
        [str(s.shard), c.name, str(c.pending), duration(c.idle_ms)]
        for s in stats.shards
        for c in s.consumers
    ]
    if consumer_rows:
        lines += ["", *_table(["shard", "consumer", "pending", "idle"], consumer_rows)]
    dl = stats.dead_letters
    reasons = ", ".join(f"{r} {n}" for r, n in dl.by_reason.items()) or "none"
    lines += ["", f"dead letters: {dl.total} ({reasons})"]
    buckets = ", ".join(f"{b} {n}" for b, n in stats.sessions.by_expiry.items() if n)
    lines.append(f"sessions: {stats.sessions.total} live" + (f" ({buckets})" if buckets else ""))
    lines.append(f"replies: {stats.replies.entries} in {stats.replies.streams} reply streams")
    return "\n".join(lines)
