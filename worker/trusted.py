"""Sessions created by trusted back ends (an HTTPS gateway), without a handshake.

The back end holds a master key, creates the session record in Redis and returns
a :class:`~worker.client.SessionGrant` to its client over its own secure channel.
"""

from __future__ import annotations

import os

import anyio
import redis.asyncio as aioredis

from worker.errors import SessionExists
from worker.handshake import SessionGrant
from worker.keys import MasterKeys
from worker.keyspace import Names
from worker.protocol import KEY_SIZE, new_id, now_ms
from worker.sessions import DEFAULT_KEY_BITS, DEFAULT_TTL_S, new_session, seal_record
from worker.streams import Store
from worker.wire import is_id


async def create_session(
    redis: aioredis.Redis,
    master_keys: MasterKeys,
    *,
    prefix: str = "sealstream",
    sid: str | None = None,
    session_key: bytes | None = None,
    ttl_s: int = DEFAULT_TTL_S,
    bits: int = DEFAULT_KEY_BITS,
) -> SessionGrant:
    """Create a session and store its sealed record; return the client's grant.

    ``session_key`` is the client's 32-byte key when it brought one (else a random
    one is drawn). Raises :class:`SessionExists` if ``sid`` is taken and
    ``ValueError`` for a malformed ``sid`` or key.
    """
    sid = sid or new_id()
    if not is_id(sid):
        raise ValueError("sid must be 32 lowercase hex characters")
    ks = session_key if session_key is not None else os.urandom(KEY_SIZE)
    if len(ks) != KEY_SIZE:
        raise ValueError("session_key must be 32 bytes")
    now = now_ms()
    session = await anyio.to_thread.run_sync(
        lambda: new_session(sid, ks=ks, now_ms=now, ttl_s=ttl_s, bits=bits)
    )
    record = seal_record(session, master_keys.active)
    # The worker's own write path (SET NX, expiring with the session).
    store = Store(redis, Names(prefix))
    if not await store.put_session(sid, record, expires_at_ms=session.expires):
        raise SessionExists("a session already exists for this sid", session_id=sid)
    return SessionGrant(
        sid=sid, public_key_pem=session.public_pem, session_key=ks, expires_at=session.expires
    )
