"""Redis Cluster and Sentinel: finding out which one a URL names, and the cluster data path.

A plain ``redis://`` URL naming any node of a cluster is enough: :func:`open_redis`
asks the node (``INFO cluster``) and returns a ``redis.asyncio.cluster.RedisCluster``
when ``cluster_enabled:1`` (``SEALSTREAM_CLUSTER=auto``, the default; ``yes`` and
``no`` force it). A ``redis+sentinel://`` URL gives the primary of a Sentinel-watched
service, which follows failovers.

On a cluster the worker's batch steps cannot be one script call: a batch spans
slots. :class:`ClusterStore` splits it by the slot of each message's ``{sid}``
(session keys share their sid's slot, so each message's atomic reply step still runs
in one script) and sends the slot groups in one pipeline across nodes. Dead letters
(``P:dlq``) and XACKs (``P:req:{n}``) live in slots of their own, so they become
commands of their own, in the order the protocol needs: a reply's dead letter before
its reply step, and XACK only once the reply or dead letter is written. MOVED/ASK and
topology changes are redis-py's cluster client's business; what is left (the cluster
down, a failover in progress) is waited out by :class:`~worker.streams.Retrier`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.cluster import key_slot
from redis.exceptions import NoScriptError, RedisError, ResponseError

from worker import scripts
from worker.errors import ConfigError
from worker.keyspace import GROUP
from worker.retrier import for_now
from worker.streams import (
    AckWrite,
    AnyRedis,
    Claim,
    Entry,
    RefusalWrite,
    ReplyWrite,
    Store,
    Write,
    claim_arguments,
    client_options,
    connect,
)

SENTINEL_SCHEME = "redis+sentinel"
#: Retry-memo entries kept at most (a write that never succeeds leaves its entry).
_MEMO_MAX = 100_000


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names a Sentinel-watched service (``redis+sentinel://``)."""
    return url.startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, str | None, int]:
    """``redis+sentinel://[:password@]host:port[,host:port]/service_name[/db]``.

    Returns the Sentinels' addresses, the service name, the password (for the
    Sentinels and the servers alike) and the database. Raises :class:`ConfigError`.
    """
    parts = urlsplit(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    password = unquote(auth.partition(":")[2]) if auth else None
    sentinels: list[tuple[str, int]] = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ConfigError("SEALSTREAM_REDIS_URL: a Sentinel URL names host:port pairs")
        sentinels.append((name.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError("SEALSTREAM_REDIS_URL: a Sentinel URL ends in /service_name[/db]")
    return sentinels, path[0], password or None, int(path[1]) if len(path) == 2 else 0


def sentinel_client(url: str, *, name: str | None = None) -> aioredis.Redis:
    """The primary of a Sentinel URL's service; it follows failovers."""
    sentinels, service, password, db = parse_sentinel_url(url)
    options = client_options(url, name=name)
    sentinel = Sentinel(
        sentinels,
        sentinel_kwargs={"password": password, "socket_connect_timeout": 5, "socket_timeout": 5},
        password=password,
        db=db,
        **options,
    )
    primary: aioredis.Redis = sentinel.master_for(service, redis_class=aioredis.Redis)
    return primary


def cluster_client(url: str, *, name: str | None = None) -> RedisCluster:
    """A cluster client bootstrapped from the node ``url`` names."""
    options = client_options(url, name=name)
    options.pop("health_check_interval", None)
    return RedisCluster.from_url(url, **options)


def initial_client(url: str, *, name: str | None = None, cluster: str = "auto") -> AnyRedis:
    """The client for ``url`` before asking the server anything (see :func:`probe`)."""
    if is_sentinel_url(url):
        return sentinel_client(url, name=name)
    if cluster == "yes":
        return cluster_client(url, name=name)
    return connect(url, name=name)


async def probe(
    client: AnyRedis, url: str, *, name: str | None = None, cluster: str = "auto"
) -> AnyRedis:
    """``client``, or a cluster client in its place when the node says it is in a cluster.

    Only a plain URL with ``cluster`` ``auto`` asks (``INFO cluster``), so Redis must
    answer: callers wrap this in their retrier.
    """
    if cluster != "auto" or is_sentinel_url(url) or isinstance(client, RedisCluster):
        return client
    try:
        info = await client.info("cluster")
    except ResponseError:
        return client  # INFO refused (an ACL, say): a single server is what works
    if str(info.get("cluster_enabled", "0")) != "1":
        return client
    await client.aclose()
    return cluster_client(url, name=name)


async def open_redis(url: str, *, name: str | None = None, cluster: str = "auto") -> AnyRedis:
    """The client ``url`` calls for: Sentinel's primary, a cluster, or one server.

    ``cluster`` (``SEALSTREAM_CLUSTER``) forces the choice (``yes``, ``no``); ``auto``
    asks the node. Raises redis-py's connection errors while Redis does not answer.
    """
    client = initial_client(url, name=name, cluster=cluster)
    try:
        return await probe(client, url, name=name, cluster=cluster)
    except BaseException:
        await client.aclose()
        raise


async def probed(store: Store, url: str, cluster: str = "auto") -> Store:
    """``store``, or a cluster store in its place when the node says it is in a cluster.

    A node unreachable now leaves ``store`` as it is: its commands are retried.
    """
    with contextlib.suppress(RedisError, OSError):
        client = await probe(store.redis, url, cluster=cluster)
        if client is not store.redis:
            return store_for(client, store.names)
    return store


def store_for(client: AnyRedis, *args: Any, **kwargs: Any) -> Store:
    """A :class:`Store` for ``client``: the cluster one for a cluster client."""
    if isinstance(client, RedisCluster):
        return ClusterStore(client, *args, **kwargs)
    return Store(client, *args, **kwargs)


def _raise_first(results: Sequence[Any]) -> None:
    """Raise the first error that means "for now" (the caller retries the call): an
    outage, a refusal for now, or the cluster client giving up on a command whose
    slot is moving ("TTL exhausted"), which is no refusal for good."""
    for r in results:
        if isinstance(r, BaseException) and for_now(r):
            raise r


class ClusterStore(Store):
    """The :class:`Store` on a Redis Cluster: batch steps split per slot and pipelined.

    Retried calls (the worker's retrier runs ``finish`` again after an outage) must
    not write a dead letter twice or lose a status: what a failed call already wrote
    is remembered by (shard, entry id) until the call succeeds.
    """

    redis: RedisCluster

    def __init__(self, client: RedisCluster, *args: Any, **kwargs: Any) -> None:
        super().__init__(client, *args, **kwargs)
        self._lettered: set[tuple[int, str]] = set()
        self._stepped: dict[tuple[int, str], int] = {}

    async def server_version(self) -> tuple[int, ...]:
        """The lowest Redis version among the cluster's nodes."""
        info = await self.redis.info("server", target_nodes=RedisCluster.ALL_NODES)
        versions = [
            tuple(int(p) for p in str(node["redis_version"]).split(".")[:3])
            for node in (info.values() if "redis_version" not in info else [info])
        ]
        return min(versions)

    async def _scripts(
        self, script: str, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """One EVALSHA per call, pipelined across nodes; NOSCRIPT loads and retries.

        A node that lost its scripts (a replica promoted, a restart) answers NOSCRIPT;
        only the calls it refused are sent again (the others ran).
        """
        sha = scripts.sha1(script)
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(3):
            async with self.redis.pipeline() as pipe:
                for i in todo:
                    keys, args = calls[i]
                    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                got = await pipe.execute(raise_on_error=False)
            for i, r in zip(todo, got, strict=True):
                results[i] = r
            todo = [i for i in todo if isinstance(results[i], NoScriptError)]
            if not todo:
                break
            await self.redis.script_load(script)  # on every primary
        return results

    async def read(self, shard: int, consumer: str, *, count: int, block_ms: int) -> list[Entry]:
        """New entries for this consumer (XREADGROUP ``>``), through the cluster client.

        A read blocked on a node whose stream leaves it (its slot migrated to another
        node, or the stream deleted) ends in ``UNBLOCKED``: nothing was read, and the
        next read finds the stream where it went (or NOGROUP, and the group is made).
        """
        stream = self.names.request_stream(shard)
        try:
            raw = await self.redis.xreadgroup(
                GROUP, consumer, {stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if str(exc).startswith("UNBLOCKED"):
                return []
            raise
        if not raw:
            return []
        # RESP3 answers a map of streams; RESP2 a list of [stream, entries] pairs.
        entries = next(iter(raw.values())) if isinstance(raw, dict) else raw[0][1]
        out = []
        for entry_id, fields in entries:
            if not fields:  # None: deleted while pending
                continue
            if not isinstance(fields, dict):
                fields = dict(zip(fields[::2], fields[1::2], strict=True))
            out.append(Entry(id=entry_id.decode(), fields=fields))
        return out

    async def get_sessions(self, sids: Sequence[str]) -> list[bytes | None]:
        """The sealed session records of ``sids``: one MGET per slot, pipelined."""
        if not sids:
            return []
        groups: dict[int, list[int]] = {}
        keys = [self.names.session(sid) for sid in sids]
        for i, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(i)
        async with self.redis.pipeline() as pipe:
            for members in groups.values():
                # Named multi-key commands are refused in a cluster pipeline; one slot each here.
                pipe.execute_command("MGET", *[keys[i] for i in members])
            got = await pipe.execute()
        out: list[bytes | None] = [None] * len(sids)
        for members, values in zip(groups.values(), got, strict=True):
            for i, value in zip(members, values, strict=True):
                out[i] = bytes(value) if value is not None else None
        return out

    async def claim(self, claims: Sequence[Claim]) -> list[str | None]:
        """The replay-record claims, one CLAIM script call per slot, pipelined."""
        if not claims:
            return []
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(claims):
            # The seen and session keys of a sid share its slot.
            groups.setdefault(key_slot(self.names.seen(c.sid, c.mid).encode()), []).append(i)
        calls = [
            claim_arguments(self.names, [claims[i] for i in members]) for members in groups.values()
        ]
        results = await self._scripts(scripts.CLAIM, calls)
        _raise_first(results)
        out: list[str | None] = [None] * len(claims)
        for members, raw in zip(groups.values(), results, strict=True):
            if isinstance(raw, Exception):
                raise raw
            for i, prev in zip(members, raw, strict=True):
                out[i] = prev.decode() if isinstance(prev, bytes) else prev
        return out

    async def finish(self, items: Sequence[Write]) -> list[int]:
        """Dead letters, then the reply steps per slot, then XACKs; FINISH's statuses."""
        if not items:
            return []
        ids = [(item.shard, item.entry_id) for item in items]
        statuses = [1] * len(items)
        await self._letters(items, ids, statuses)
        await self._steps(items, ids, statuses)
        await self._acks(items, statuses)
        for key in ids:
            self._lettered.discard(key)
            self._stepped.pop(key, None)
        return statuses

    async def _letters(
        self, items: Sequence[Write], ids: list[tuple[int, str]], statuses: list[int]
    ) -> None:
        todo = [
            i
            for i, item in enumerate(items)
            if not isinstance(item, AckWrite) and item.letter and ids[i] not in self._lettered
        ]
        if not todo:
            return
        async with self.redis.pipeline() as pipe:
            for i in todo:
                letter = items[i].letter
                assert letter is not None
                pipe.xadd(self.names.dlq, dict(letter), maxlen=self.dlq_maxlen, approximate=True)
            got = await pipe.execute(raise_on_error=False)
        for i, r in zip(todo, got, strict=True):
            if not isinstance(r, Exception):
                self._lettered.add(ids[i])
        _raise_first(got)
        for i, r in zip(todo, got, strict=True):
            if isinstance(r, Exception):  # refused for good (WRONGTYPE, say)
                statuses[i] = -3 if isinstance(items[i], ReplyWrite) else 1 | 4
        if len(self._lettered) > _MEMO_MAX:
            self._lettered.clear()

    async def _steps(
        self, items: Sequence[Write], ids: list[tuple[int, str]], statuses: list[int]
    ) -> None:
        n = self.names
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            if ids[i] in self._stepped:
                statuses[i] = self._stepped[ids[i]] | (statuses[i] if statuses[i] > 1 else 0)
                continue
            if isinstance(item, ReplyWrite) and statuses[i] != -3:
                groups.setdefault(key_slot(n.seen(item.sid, item.mid).encode()), []).append(i)
            elif isinstance(item, RefusalWrite) and item.sid is not None and item.notice:
                groups.setdefault(key_slot(n.reply_stream(item.sid).encode()), []).append(i)
        if not groups:
            return
        calls = []
        for members in groups.values():
            keys: list[str] = []
            args: list[Any] = [self.reply_maxlen, self.fallback_ttl_ms]
            for i in members:
                item = items[i]
                if isinstance(item, ReplyWrite):
                    keys += (n.seen(item.sid, item.mid), n.reply_stream(item.sid))
                    keys.append(n.session(item.sid))
                    ((field, payload),) = item.entry.items()
                    args += ("R", item.owner, field, payload, item.seen_ttl_ms)
                    args += (item.session_record or b"", item.session_expires_at_ms or 0)
                else:
                    assert isinstance(item, RefusalWrite) and item.sid and item.notice
                    keys += (n.reply_stream(item.sid), n.session(item.sid))
                    ((field, payload),) = item.notice.items()
                    args += ("N", field, payload)
            calls.append((keys, args))
        results = await self._scripts(scripts.SLOT_FINISH, calls)
        for members, raw in zip(groups.values(), results, strict=True):
            if isinstance(raw, Exception):
                continue
            for i, status in zip(members, raw, strict=True):
                status = int(status)
                self._stepped[ids[i]] = status
                if isinstance(items[i], ReplyWrite):
                    statuses[i] = status
                else:  # a refusal: 1, plus 2 if the notice failed, plus 4 (its letter)
                    statuses[i] = status | statuses[i]
        _raise_first(results)
        for raw in results:
            if isinstance(raw, Exception):
                raise raw
        if len(self._stepped) > _MEMO_MAX:
            self._stepped.clear()

    async def _acks(self, items: Sequence[Write], statuses: list[int]) -> None:
        acks: dict[str, list[str]] = {}
        for item, status in zip(items, statuses, strict=True):
            if isinstance(item, ReplyWrite) and status < 0:
                continue  # not answered: the caller refuses it, or it stays pending
            acks.setdefault(self.names.request_stream(item.shard), []).append(item.entry_id)
        if not acks:
            return
        async with self.redis.pipeline() as pipe:
            for stream, entry_ids in acks.items():
                pipe.xack(stream, GROUP, *entry_ids)
            got = await pipe.execute(raise_on_error=False)
        _raise_first(got)  # anything else (a stream of the wrong type) is left, as FINISH does
