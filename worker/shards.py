"""Growing the number of request shards while workers run (``sealstream shards set N``).

``P:config`` ``shards`` is the count clients hash message ids over. Raising it is
safe at any time: the streams and the ``workers`` group of the new shards are
created first (at id 0, so an entry a client adds before any worker reads it is
still delivered), then ``shards`` is written. Workers read ``P:config`` on every
trim pass and start readers for new shards; clients read it again every few
seconds. Lowering it is refused while a shard that would be dropped still holds
entries (stored, pending or not yet delivered); workers already reading such a
shard go on reading it until they restart.
"""

from __future__ import annotations

import re

from redis.exceptions import ResponseError

from worker.errors import ConfigError, InvalidArgument
from worker.keyspace import GROUP, Names
from worker.streams import AnyRedis

MAX_SHARDS = 1024  # as SEALSTREAM_SHARDS allows
#: How often a client reads ``P:config`` ``shards`` again (shards may be added).
SHARDS_REFRESH_S = 5.0


def parse_shards(config: dict[str, str], names: Names) -> int:
    """``shards`` of a ``P:config`` read as text (1 when absent).

    Raises :class:`ConfigError` for anything but an integer 1..1024: Redis may be
    written by anyone, and a bad value must not reach ``%``.
    """
    raw = config.get("shards", "1")
    if re.fullmatch(r"[1-9][0-9]{0,3}", raw) is None or int(raw) > MAX_SHARDS:
        raise ConfigError(
            f"P:config shards ({names.config}): expected an integer"
            f" 1..{MAX_SHARDS}, got {raw[:20]!r}"
        )
    return int(raw)


async def current_shards(redis: AnyRedis, *, prefix: str = "sealstream") -> int:
    """``P:config`` ``shards``; 1 when no worker has published it yet."""
    raw = await redis.hget(Names(prefix).config, "shards")
    text = raw.decode() if isinstance(raw, bytes) else str(raw or "1")
    if re.fullmatch(r"[1-9][0-9]{0,3}", text) is None:
        return 1
    return int(text)


async def set_shards(redis: AnyRedis, shards: int, *, prefix: str = "sealstream") -> int:
    """Set ``P:config`` ``shards`` to ``shards``; return the count it had.

    Raises :class:`InvalidArgument` (nothing changed) for a count outside 1..1024, or
    when lowering it would drop a shard that still holds entries.
    """
    if not 1 <= shards <= MAX_SHARDS:
        raise InvalidArgument(f"N: expected 1..{MAX_SHARDS}, got {shards}")
    names = Names(prefix)
    before = await current_shards(redis, prefix=prefix)
    for shard in range(shards, before):
        held = int(await redis.xlen(names.request_stream(shard)))
        if held:
            raise InvalidArgument(
                f"shard {shard} ({names.request_stream(shard)}) still holds {held} entries:"
                f" cannot go below {shard + 1} shards until it is drained"
            )
    for shard in range(shards):
        try:
            await redis.xgroup_create(names.request_stream(shard), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    await redis.hset(names.config, "shards", shards)
    return before
