"""Every Redis command the worker and client issue, in one place.

Composes a ``redis.asyncio.Redis`` (never subclasses it). The two Lua scripts make
the protocol's atomic steps: a reply is added only while the replay record is still
this entry's, and in the same step the record becomes ``<entry id>|done`` (and, for
a handshake, the session record is created). Each script touches one slot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import anyio
import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    NoScriptError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import scripts
from worker.keyspace import GROUP, Names
from worker.retrier import Retrier, transient

Fields = dict[bytes, bytes]
__all__ = ["AnyRedis", "Retrier", "Store", "client_options", "connect", "transient"]


#: The client a Store holds: one server (or a Sentinel-watched primary), or a cluster.
AnyRedis: TypeAlias = aioredis.Redis | RedisCluster
#: Entries one XTRIM call frees at most (:meth:`Store.trim`): ~0.7 ms of Redis's time
#: at 4 KiB an entry on the development machine.
TRIM_STEP = 1000


def client_options(url: str, *, name: str | None = None) -> dict[str, Any]:
    """Connection options every sealstream client shares (see :func:`connect`)."""
    # Keepalive is a TCP option: redis-py's Unix-socket connection refuses it.
    tcp = {} if url.startswith("unix:") else {"socket_keepalive": True}
    return {
        "client_name": name,
        "decode_responses": False,
        **tcp,
        "socket_connect_timeout": 5,
        # Longer than any blocking read we issue, so a hung server cannot hang us.
        "socket_timeout": 15,
        "health_check_interval": 15,
        "retry": Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.02), 2),
    }


def connect(url: str, *, name: str | None = None) -> aioredis.Redis:
    """A Redis client for sealstream: bytes replies, keepalive, a short retry.

    ``name`` is set on every connection (CLIENT SETNAME) so operators can tell
    workers apart in CLIENT LIST. Longer outages are ridden out by the worker's
    own capped backoff, which logs once per outage. For a cluster or a Sentinel URL
    use :func:`worker.cluster.open_redis`.
    """
    return aioredis.Redis.from_url(url, **client_options(url, name=name))


@dataclass(slots=True, kw_only=True)  # not frozen: built per message, 3x cheaper; never mutated
class Entry:
    """A stream entry: its id and raw fields."""

    id: str
    fields: Fields


@dataclass(frozen=True, slots=True, kw_only=True)
class Pending:
    """A pending list summary for one shard."""

    count: int
    oldest: str | None


@dataclass(slots=True, kw_only=True)  # not frozen: built per message, 3x cheaper; never mutated
class Claim:
    """A replay-record claim: ``owner`` is ``<shard>|<entry id>``; with
    ``session_digest`` the record is set only while the session record's SHA-1 (hex)
    is that digest."""

    sid: str
    mid: str
    owner: str
    ttl_ms: int
    session_digest: str | None = None


Letter = Mapping[str, bytes | str | int]


def claim_arguments(names: Names, claims: Sequence[Claim]) -> tuple[list[str], list[Any]]:
    """CLAIM's KEYS and ARGV for ``claims`` (see :data:`worker.scripts.CLAIM`)."""
    keys: list[str] = []
    args: list[Any] = []
    for c in claims:
        keys += (names.seen(c.sid, c.mid), names.session(c.sid))
        args += (c.owner, c.ttl_ms, c.session_digest or "")
    return keys, args


@dataclass(slots=True, kw_only=True)  # not frozen: built per message, 3x cheaper; never mutated
class ReplyWrite:
    """A reply added iff the replay record is still ``owner``'s, then marked done and acked.

    ``letter`` (a dead letter) is written first; ``session_record`` is created (NX)
    in the same step (a handshake).
    """

    shard: int
    entry_id: str
    sid: str
    mid: str
    owner: str
    entry: Mapping[str, bytes]
    seen_ttl_ms: int
    letter: Letter | None = None
    session_record: bytes | None = None
    session_expires_at_ms: int | None = None


@dataclass(slots=True, kw_only=True)  # not frozen: built per message, 3x cheaper; never mutated
class RefusalWrite:
    """A refusal: a notice to ``sid`` (when given), a dead letter, then XACK."""

    shard: int
    entry_id: str
    letter: Letter
    sid: str | None = None
    notice: Mapping[str, bytes] | None = None


@dataclass(slots=True, kw_only=True)  # not frozen: built per message, 3x cheaper; never mutated
class AckWrite:
    """A bare XACK (a redelivery of an entry already answered)."""

    shard: int
    entry_id: str
    letter: Letter | None = None


Write = ReplyWrite | RefusalWrite | AckWrite


def _flat(letter: Letter) -> list[bytes | str | int]:
    out: list[bytes | str | int] = []
    for name, value in letter.items():
        out += (name, value)
    return out


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(raw: Sequence[Any]) -> list[Entry]:
    out = []
    for entry_id, fields in raw:
        if fields is None:  # deleted while pending
            continue
        out.append(Entry(id=_s(entry_id), fields=dict(fields)))
    return out


class Store:
    """Redis operations of the protocol, named by what they mean."""

    def __init__(
        self,
        client: aioredis.Redis,
        names: Names,
        *,
        reply_maxlen: int = 1000,
        dlq_maxlen: int = 100_000,
        fallback_ttl_ms: int = 1_800_000,
    ) -> None:
        self.redis = client
        self.names = names
        self.reply_maxlen = reply_maxlen
        self.dlq_maxlen = dlq_maxlen
        #: how long a reply stream lives when its sid has no session (2 x window)
        self.fallback_ttl_ms = fallback_ttl_ms

    async def _one(self, queue: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run one command (``queue`` calls it on the client)."""
        return await queue(self.redis)

    async def _script(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script first when Redis does not know it (a restart)."""
        sha = scripts.sha1(script)
        try:
            return await self._packed("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.redis.script_load(script)
            return await self._packed("EVALSHA", sha, len(keys), *keys, *args)

    async def _packed(self, *args: Any) -> Any:
        """Send one command packed by hiredis, in C.

        The batch scripts carry hundreds of arguments, and redis-py's asyncio client
        packs each in Python (a large share of the worker's CPU, measured). The reply
        is read and parsed by redis-py as usual; error replies raise as usual.
        """
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(hiredis.pack_command(args), check_health=False)
            return await conn.read_response()
        except (RedisConnectionError, RedisTimeoutError, OSError, anyio.get_cancelled_exc_class()):
            # The connection may hold half a reply: never hand it out again.
            with anyio.CancelScope(shield=True):
                await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    # -- setup ---------------------------------------------------------------------

    async def server_version(self) -> tuple[int, ...]:
        """The Redis server's version, e.g. ``(7, 0, 15)``."""
        info = await self.redis.info("server")
        return tuple(int(part) for part in str(info["redis_version"]).split(".")[:3])

    async def ensure_groups(self, shards: int) -> None:
        """Create group ``workers`` at id 0 (MKSTREAM) on every shard; idempotent."""
        for shard in range(shards):
            try:
                await self.redis.xgroup_create(
                    self.names.request_stream(shard), GROUP, id="0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def publish_config(self, *, shards: int, public_pem: str, kid: str) -> None:
        """Write ``P:config`` (``shards``, ``servicePublicKey``, ``kid``)."""
        await self.redis.hset(
            self.names.config,
            mapping={"shards": shards, "servicePublicKey": public_pem, "kid": kid},
        )

    async def read_config(self) -> dict[str, str]:
        """``P:config`` as text."""
        raw = await self.redis.hgetall(self.names.config)
        return {_s(k): _s(v) for k, v in raw.items()}

    # -- consuming -----------------------------------------------------------------

    async def read(self, shard: int, consumer: str, *, count: int, block_ms: int) -> list[Entry]:
        """New entries for this consumer (XREADGROUP ``>``)."""
        stream = self.names.request_stream(shard)
        raw = await self._packed(
            "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", count, "BLOCK", block_ms,
            "STREAMS", stream, ">",
        )  # fmt: skip
        if not raw:
            return []
        # RESP3 (redis-py's default) answers a map of streams; RESP2 a list of pairs.
        entries = next(iter(raw.values())) if isinstance(raw, dict) else raw[0][1]
        out = []
        for entry_id, flat in entries:
            if flat:  # None: deleted while pending
                # One field (a request) without the pairing of a general entry.
                fields = {flat[0]: flat[1]} if len(flat) == 2 else _pairs(flat)
                out.append(Entry(id=entry_id.decode(), fields=fields))
        return out

    async def autoclaim(
        self, shard: int, consumer: str, *, min_idle_ms: int, start: str, count: int
    ) -> tuple[str, list[Entry]]:
        """Claim entries idle past ``min_idle_ms`` from any consumer (XAUTOCLAIM)."""
        raw = await self.redis.xautoclaim(
            self.names.request_stream(shard),
            GROUP,
            consumer,
            min_idle_ms,
            start_id=start,
            count=count,
        )
        return _s(raw[0]), _entries(raw[1])

    async def delivery_counts(self, shard: int, ids: Sequence[str]) -> dict[str, int]:
        """Each pending entry's delivery count (from the pending list)."""
        stream = self.names.request_stream(shard)
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
            results = await pipe.execute()
        counts: dict[str, int] = {}
        for entry_id, rows in zip(ids, results, strict=True):
            if rows:
                counts[entry_id] = int(rows[0]["times_delivered"])
        return counts

    async def touch(self, shard: int, consumer: str, ids: Sequence[str]) -> None:
        """Reset the idle time of entries this worker is still processing."""
        if ids:
            await self.redis.xclaim(
                self.names.request_stream(shard), GROUP, consumer, 0, list(ids), justid=True
            )

    async def ack(self, shard: int, entry_id: str) -> None:
        """XACK one entry."""
        stream = self.names.request_stream(shard)
        await self._one(lambda p: p.xack(stream, GROUP, entry_id))

    async def pending(self, shard: int) -> Pending:
        """The shard's pending-list summary."""
        raw = await self.redis.xpending(self.names.request_stream(shard), GROUP)
        oldest = raw.get("min")
        return Pending(count=int(raw["pending"]), oldest=_s(oldest) if oldest else None)

    async def lag(self, shard: int) -> int:
        """Entries of the shard not yet delivered to the group (XINFO GROUPS ``lag``).

        0 when the stream has no such group; 1 when Redis cannot tell (``lag`` is nil after
        some deletions), so a caller waiting for 0 does not stop early.
        """
        groups = await self.redis.xinfo_groups(self.names.request_stream(shard))
        for g in groups:
            if _s(g["name"]) == GROUP:
                lag = g.get("lag")
                return int(lag) if lag is not None else 1
        return 0

    async def trim(self, shard: int) -> int:
        """XTRIM MINID behind the group: never past a pending or undelivered entry.

        The group's last-delivered id is read before the pending list, so an entry
        delivered in between is newer than the bound and survives. Redis frees
        trimmed entries while every other client waits (~5 ms for 7,000 entries of
        4 KiB here), so a backlog goes in steps of at most :data:`TRIM_STEP` entries
        (whole stream nodes, ``MINID ~ … LIMIT``), other clients' commands running
        between them; an exact trim then takes what is left below the bound, less
        than a node's worth. A node holds at most 100 entries at Redis's default
        ``stream-node-max-entries``; on a server set above TRIM_STEP (or to 0, with a
        large ``stream-node-max-bytes``) no node fits in a step, and the exact trim
        frees the whole backlog in one call.
        """
        stream = self.names.request_stream(shard)
        groups = await self.redis.xinfo_groups(stream)
        group = next((g for g in groups if _s(g["name"]) == GROUP), None)
        if group is None:
            return 0
        last = _s(group["last-delivered-id"])
        pending = await self.pending(shard)
        if pending.oldest is not None:
            bound = pending.oldest
        else:
            ms, seq = (int(p) for p in last.split("-"))
            bound = f"{ms}-{seq + 1}"
        if bound in ("0-1", "0-0"):
            return 0
        trimmed = 0
        while step := int(
            await self.redis.xtrim(stream, minid=bound, approximate=True, limit=TRIM_STEP)
        ):
            trimmed += step
        return trimmed + int(await self.redis.xtrim(stream, minid=bound, approximate=False))

    async def delete_idle_consumers(self, shard: int, *, idle_ms: int) -> int:
        """Remove consumers with nothing pending that have been idle past ``idle_ms``."""
        stream = self.names.request_stream(shard)
        removed = 0
        for c in await self.redis.xinfo_consumers(stream, GROUP):
            if int(c["pending"]) == 0 and int(c["idle"]) > idle_ms:
                await self.redis.xgroup_delconsumer(stream, GROUP, _s(c["name"]))
                removed += 1
        return removed

    # -- sessions and replay ---------------------------------------------------------

    async def get_session(self, sid: str) -> bytes | None:
        """The sealed session record, or None."""
        key = self.names.session(sid)
        raw = await self._one(lambda p: p.get(key))
        return bytes(raw) if raw is not None else None

    async def session_exists(self, sid: str) -> bool:
        """Whether a session record exists for ``sid``."""
        key = self.names.session(sid)
        return bool(await self._one(lambda p: p.exists(key)))

    async def put_session(self, sid: str, record: bytes, *, expires_at_ms: int) -> bool:
        """Store a new session record (NX) expiring at ``expires_at_ms``."""
        ok = await self.redis.set(self.names.session(sid), record, nx=True, pxat=expires_at_ms)
        return bool(ok)

    async def get_sessions(self, sids: Sequence[str]) -> list[bytes | None]:
        """The sealed session records of ``sids`` (None where there is none), in one MGET."""
        if not sids:
            return []
        raw = await self._packed("MGET", *[self.names.session(sid) for sid in sids])
        return [bytes(r) if r is not None else None for r in raw]

    async def claim(self, claims: Sequence[Claim]) -> list[str | None]:
        """Set each request's replay record (NX) in one step; return the previous values.

        None: this call set it. ``"!"``: the key holds another type. ``"?"``: the
        session record is not the one the claim names (changed or gone; nothing set). A record
        equal to the claim's owner is a redelivery (its expiry is pushed out, never
        in). Retry-safe: a retried call finds its own owner, as a redelivery does.
        """
        if not claims:
            return []
        keys, args = claim_arguments(self.names, claims)
        raw = await self._script(scripts.CLAIM, keys, args)
        return [_s(r) if r is not None else None for r in raw]

    async def finish(self, items: Sequence[Write]) -> list[int]:
        """Write replies, notices and dead letters and acknowledge, in one step.

        See :data:`worker.scripts.FINISH` for what each status means.
        """
        if not items:
            return []
        n = self.names
        keys: list[str] = []
        args: list[Any] = [self.reply_maxlen, self.fallback_ttl_ms, self.dlq_maxlen, GROUP]
        for item in items:
            stream = n.request_stream(item.shard)
            letter = _flat(item.letter) if item.letter else []
            if isinstance(item, ReplyWrite):
                keys += (n.seen(item.sid, item.mid), n.reply_stream(item.sid))
                keys += (n.session(item.sid), stream)
                ((field, payload),) = item.entry.items()
                args += ("R", item.entry_id, item.owner, field, payload, item.seen_ttl_ms)
                args += (item.session_record or b"", item.session_expires_at_ms or 0)
                args.append(len(letter) // 2)
                if letter:
                    keys.append(n.dlq)
                    args += letter
            elif isinstance(item, RefusalWrite):
                args += ("N", item.entry_id)
                if item.sid is not None and item.notice is not None:
                    ((field, payload),) = item.notice.items()
                    keys += (n.reply_stream(item.sid), n.session(item.sid))
                    args += ("1", field, payload)
                else:
                    args.append("0")
                keys += (n.dlq, stream)
                args.append(len(letter) // 2)
                args += letter
            else:
                keys.append(stream)
                args += ("A", item.entry_id)
        raw = await self._script(scripts.FINISH, keys, args)
        return [int(r) for r in raw]

    async def dead_letter(self, fields: Mapping[str, bytes | str | int]) -> None:
        """Add a dead letter to ``P:dlq``."""
        stream, entry = self.names.dlq, dict(fields)
        await self._one(lambda p: p.xadd(stream, entry, maxlen=self.dlq_maxlen, approximate=True))

    # -- client side ---------------------------------------------------------------

    async def add_request(self, shard: int, entry: Mapping[str, bytes]) -> str:
        """XADD a request entry to shard ``n``; return its id."""
        return _s(await self.redis.xadd(self.names.request_stream(shard), dict(entry)))

    async def read_replies(
        self, sid: str, *, after: str, block_ms: int, count: int = 100
    ) -> list[Entry]:
        """Reply entries after ``after`` (XREAD BLOCK)."""
        raw = await self.redis.xread(
            {self.names.reply_stream(sid): after}, count=count, block=block_ms
        )
        if not raw:
            return []
        return _entries(raw[0][1])


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """An entry's flat field/value list as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
