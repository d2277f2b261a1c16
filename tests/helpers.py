"""Building blocks for tests that speak the wire protocol directly, and for tests that
wait on Redis or on other processes."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import anyio
import redis.asyncio as aioredis

from worker import codec, envelopes, wire
from worker.client import Client
from worker.crypto import x25519_keypair
from worker.handlers import App
from worker.handshake import SessionGrant, hello_plaintext, seal_hello
from worker.keys import load_public_key
from worker.keyspace import Names
from worker.protocol import ALG_RSA, ALG_SK, KEY_SIZE, new_id, now_ms
from worker.runtime import Worker
from worker.settings import Settings
from worker.streams import Entry, Store
from worker.testing import ThrowawayKeys, running_worker
from worker.trusted import create_session

T = TypeVar("T")


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T | None]], *, timeout: float = ..., interval: float = ...
) -> T: ...


@overload
async def wait_until(
    predicate: Callable[[], T | None], *, timeout: float = ..., interval: float = ...
) -> T: ...


async def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Call ``predicate`` (sync or async) every ``interval`` s until it returns something
    truthy, and return that; TimeoutError after ``timeout`` s.

    For state in Redis or in another process, where no in-process event exists.
    """
    with anyio.fail_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await anyio.sleep(interval)


def open_client(settings: Settings, keys: ThrowawayKeys, **options: Any) -> Client:
    """A client of the test's Redis and prefix, pinning the throwaway service key."""
    return Client.from_url(
        settings.redis_url, kid=keys.service.kid, prefix=settings.prefix, **options
    )


@dataclass
class Raw:
    """A hand-driven client: crafts entries, XADDs them, waits for replies by mid."""

    redis: aioredis.Redis
    prefix: str
    keys: ThrowawayKeys

    @property
    def store(self) -> Store:
        return Store(self.redis, Names(self.prefix))

    @property
    def names(self) -> Names:
        return Names(self.prefix)

    async def grant(self, *, ttl_s: int = 600) -> SessionGrant:
        """A session created the trusted back end's way."""
        return await create_session(self.redis, self.keys.master, prefix=self.prefix, ttl_s=ttl_s)

    def seal(
        self,
        grant: SessionGrant,
        payload: Any,
        *,
        alg: str = ALG_SK,
        field: wire.Field = "e",
        type_: str = "echo",
        mid: str | None = None,
        ts: int | None = None,
        plaintext: bytes | None = None,
    ) -> envelopes.Outgoing:
        """A sealed request for ``grant``'s session."""
        return envelopes.seal_request(
            field=field,
            alg=alg,
            sid=grant.sid,
            mid=mid or new_id(),
            ts=now_ms() if ts is None else ts,
            type_=type_,
            plaintext=codec.dumps(payload, field) if plaintext is None else plaintext,
            public_key=load_public_key(grant.public_key_pem) if alg == ALG_RSA else None,
            ks=grant.session_key if alg == ALG_SK else None,
        )

    async def send(self, request: wire.Request, *, shard: int = 0) -> str:
        """XADD a request envelope; return the entry id."""
        return await self.store.add_request(shard, wire.encode_request(request))

    async def send_fields(self, fields: dict[str, Any], *, shard: int = 0) -> str:
        """XADD arbitrary fields to a request shard."""
        raw = await self.redis.xadd(self.names.request_stream(shard), fields)
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def get(self, key: str) -> bytes | None:
        """GET a key as bytes."""
        value: Any = await self.redis.get(key)
        return bytes(value) if value is not None else None

    async def reply(self, sid: str, mid: str, *, timeout: float = 10.0) -> wire.Reply:
        """Wait for the reply (or notice) to ``mid`` on ``sid``'s stream."""
        after = "0-0"
        with anyio.fail_after(timeout):
            while True:
                for entry in await self.store.read_replies(sid, after=after, block_ms=200):
                    after = entry.id
                    reply = wire.decode_reply(entry.fields)
                    if reply.mid == mid:
                        return reply

    async def replies(self, sid: str) -> list[wire.Reply]:
        """Every reply on ``sid``'s stream now."""
        raw = await self.redis.xrange(self.names.reply_stream(sid))
        return [wire.decode_reply(dict(f)) for _, f in raw]

    async def reply_with(
        self, sid: str, mid: str, status: str, *, timeout: float = 10.0, interval: float = 0.02
    ) -> wire.Reply:
        """Wait for the reply to ``mid`` with ``status`` (several replies may share a mid)."""

        async def found() -> wire.Reply | None:
            return next(
                (r for r in await self.replies(sid) if r.mid == mid and r.status == status), None
            )

        return await wait_until(found, timeout=timeout, interval=interval)

    async def dead_letters(self) -> list[dict[str, bytes]]:
        """Every dead letter now, fields with str keys."""
        raw = await self.redis.xrange(self.names.dlq)
        return [{k.decode(): v for k, v in f.items()} for _, f in raw]

    async def wait_dead_letters(self, n: int, *, timeout: float = 10.0) -> list[dict[str, bytes]]:
        """Wait until at least ``n`` dead letters exist; return them."""

        async def enough() -> list[dict[str, bytes]] | None:
            letters = await self.dead_letters()
            return letters if len(letters) >= n else None

        return await wait_until(enough, timeout=timeout)

    async def letters_for(self, entry_id: str) -> list[dict[str, bytes]]:
        """The dead letters naming entry ``entry_id`` now."""
        return [
            letter for letter in await self.dead_letters() if letter.get("id") == entry_id.encode()
        ]

    async def letter_for(self, entry_id: str, *, timeout: float = 10.0) -> dict[str, bytes]:
        """Wait for the (first) dead letter of entry ``entry_id``."""
        letters = await wait_until(lambda: self.letters_for(entry_id), timeout=timeout)
        return letters[0]

    async def pending(self, shard: int = 0) -> int:
        """Entries pending (delivered, unacknowledged) on a shard."""
        return (await self.store.pending(shard)).count

    async def wait_drained(self, shard: int = 0, *, timeout: float = 10.0) -> None:
        """Wait until the shard has nothing pending or unread."""

        async def drained() -> bool:
            (g, *_) = await self.redis.xinfo_groups(self.names.request_stream(shard))
            return int(g["pending"]) == 0 and int(g.get("lag") or 0) == 0

        await wait_until(drained, timeout=timeout)


def open_ok(reply: wire.Reply, out: envelopes.Outgoing) -> Any:
    """Authenticate and decode a reply to ``out``."""
    plaintext = envelopes.open_reply(reply, reply_key=out.reply_key, request=out.request)
    return codec.loads(plaintext, out.request.field)


def handshake(
    keys: ThrowawayKeys,
    *,
    sid: str | None = None,
    kid: str | None = None,
    ec: bytes | None = None,
    field: wire.Field = "e",
    ttl: int | None = 600,
    body: dict[str, Any] | None = None,
) -> envelopes.Outgoing:
    """A handshake as Client.handshake builds it (``ttl`` None: none asked for; or with
    ``body`` as given), under the service key; its reply key is Kb."""
    if body is None:
        plaintext = hello_plaintext(ec or x25519_keypair()[1], field, ttl_s=ttl)
    else:
        plaintext = codec.dumps(body, field)
    return seal_hello(
        keys.service.public_key,
        plaintext,
        field=field,
        sid=sid or new_id(),
        mid=new_id(),
        ts=now_ms(),
        kb=os.urandom(KEY_SIZE),
        kid=kid or keys.service.kid,
    )


def unknown_session(keys: ThrowawayKeys) -> SessionGrant:
    """A grant for a sid that has no session (any RSA key will do for sealing)."""
    return SessionGrant(
        sid=new_id(),
        public_key_pem=keys.service.public_pem,
        session_key=os.urandom(KEY_SIZE),
        expires_at=now_ms() + 600_000,
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Rig:
    """A running worker, a raw client, handler call counts and the worker's clock offset
    (``offset_ms[0]`` ms ahead of the real one; a test may move it)."""

    raw: Raw
    worker: Worker
    calls: Counter[str]
    offset_ms: list[int]

    @property
    def stream(self) -> str:
        """Request shard 0."""
        return self.raw.names.request_stream(0)


@contextlib.asynccontextmanager
async def serving(
    app: App,
    calls: Counter[str],
    settings: Settings,
    keys: ThrowawayKeys,
    redis: aioredis.Redis,
    **changes: Any,
) -> AsyncIterator[Rig]:
    """Run a worker with ``app`` (whose handlers count into ``calls``) for the block,
    with ``settings`` changed by ``changes`` and a clock the test can move."""
    offset = [0]
    settings = dataclasses.replace(settings, **changes)
    async with running_worker(app, settings, keys, clock=lambda: now_ms() + offset[0]) as worker:
        yield Rig(
            raw=Raw(redis, settings.prefix, keys), worker=worker, calls=calls, offset_ms=offset
        )


__all__ = [
    "ALG_RSA",
    "ALG_SK",
    "Entry",
    "Raw",
    "Rig",
    "handshake",
    "new_id",
    "now_ms",
    "open_client",
    "open_ok",
    "serving",
    "unknown_session",
    "wait_until",
]
