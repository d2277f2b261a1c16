"""Building blocks for tests that speak the wire protocol directly."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aioredis

from worker import messages, wire
from worker.backend import create_session
from worker.client import SessionGrant, new_id
from worker.envelope import ALG_RSA, ALG_SK
from worker.keys import load_public_key
from worker.names import Names
from worker.streams import Entry, Store
from worker.testing import ThrowawayKeys


def now_ms() -> int:
    """Milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


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
    ) -> messages.Outgoing:
        """A sealed request for ``grant``'s session."""
        return messages.seal_request(
            field=field,
            alg=alg,
            sid=grant.sid,
            mid=mid or new_id(),
            ts=now_ms() if ts is None else ts,
            type_=type_,
            plaintext=wire.dumps(payload, field) if plaintext is None else plaintext,
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

    async def dead_letters(self) -> list[dict[str, bytes]]:
        """Every dead letter now, fields with str keys."""
        raw = await self.redis.xrange(self.names.dlq)
        return [{k.decode(): v for k, v in f.items()} for _, f in raw]

    async def wait_dead_letters(self, n: int, *, timeout: float = 10.0) -> list[dict[str, bytes]]:
        """Wait until at least ``n`` dead letters exist; return them."""
        with anyio.fail_after(timeout):
            while len(letters := await self.dead_letters()) < n:
                await anyio.sleep(0.02)
        return letters

    async def pending(self, shard: int = 0) -> int:
        """Entries pending (delivered, unacknowledged) on a shard."""
        return (await self.store.pending(shard)).count

    async def wait_drained(self, shard: int = 0, *, timeout: float = 10.0) -> None:
        """Wait until the shard has nothing pending or unread."""
        with anyio.fail_after(timeout):
            while True:
                groups = await self.redis.xinfo_groups(self.names.request_stream(shard))
                g = groups[0]
                if int(g["pending"]) == 0 and int(g.get("lag") or 0) == 0:
                    return
                await anyio.sleep(0.02)


def open_ok(reply: wire.Reply, out: messages.Outgoing) -> Any:
    """Authenticate and decode a reply to ``out``."""
    plaintext = messages.open_reply(reply, reply_key=out.reply_key, request=out.request)
    return wire.loads(plaintext, out.request.field)


__all__ = ["ALG_RSA", "ALG_SK", "Entry", "Raw", "new_id", "now_ms", "open_ok"]
