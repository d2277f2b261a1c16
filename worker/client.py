"""The Python client: pin the service key, handshake, send requests, await replies.

::

    async with Client.from_url(url, kid=PINNED_KID) as client:
        async with client.session() as session:          # handshake; reader running
            result = await session.request("echo", {"x": 1})

One reader task per session reads the reply stream and hands each reply to the
waiter with its ``mid``; replies to :meth:`ClientSession.submit` go to
:meth:`ClientSession.replies`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import redis.asyncio as aioredis
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from cryptography.hazmat.primitives.asymmetric import rsa

from worker import messages, wire
from worker.envelope import (
    ALG_RSA,
    ALG_SK,
    ALGORITHMS,
    HANDSHAKE_TYPE,
    KEY_SIZE,
    handshake_session_key,
    kid_of,
    x25519_keypair,
    x25519_shared,
)
from worker.errors import (
    ConfigError,
    DecryptError,
    Malformed,
    RemoteError,
    ReplyTimeout,
    RequestRejected,
)
from worker.keys import load_public_key
from worker.logging import get_logger
from worker.names import Names
from worker.streams import Retrier, Store, connect

log = get_logger("sealstream.client")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_id() -> str:
    """A fresh ``sid``/``mid``: 16 random bytes as 32 lowercase hex chars."""
    return os.urandom(16).hex()


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionGrant:
    """What a client needs to use a session: give it only over a secure channel."""

    sid: str
    public_key_pem: str
    session_key: bytes = field(repr=False)
    expires_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """A reply as :meth:`ClientSession.replies` yields it."""

    mid: str
    type: str
    status: str
    value: Any = None
    code: str | None = None
    message: str | None = None

    def unwrap(self) -> Any:
        """The value of an ``ok`` result; raise RemoteError/RequestRejected otherwise."""
        if self.status == "ok":
            return self.value
        if self.status == "error":
            raise RemoteError(self.code or "", self.message or "", message_id=self.mid)
        raise RequestRejected(self.code or "rejected", message_id=self.mid)


@dataclass(slots=True, kw_only=True)
class _Waiter:
    outgoing: messages.Outgoing
    type: str
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Result | None = None
    streamed: bool = False


class Client:
    """A producer/consumer of encrypted requests over one Redis connection pool.

    Pin the service key by ``kid`` (checked against ``P:config``), or pass the
    public key itself (``service_public_key``, PEM), or both.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        kid: str | None = None,
        service_public_key: str | bytes | None = None,
        prefix: str = "sealstream",
        encoding: wire.Field = "e",
        shards: int | None = None,
    ) -> None:
        if kid is None and service_public_key is None:
            raise ConfigError("Client needs the pinned service kid or service public key")
        self.store = Store(redis, Names(prefix))
        self._retry = Retrier()
        self.kid = kid
        self.encoding = encoding
        self._service_pem = service_public_key
        self._service_key: rsa.RSAPublicKey | None = None
        self._shards = shards
        self._owned = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Client:
        """A client with its own connection pool (closed by ``async with``)."""
        client = cls(connect(url), **kwargs)
        client._owned = True
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool if this client created it."""
        if self._owned:
            await self.store.redis.aclose()

    async def service_key(self) -> rsa.RSAPublicKey:
        """The pinned service public key (fetched from ``P:config`` if not given)."""
        if self._service_key is not None:
            return self._service_key
        config = await self.store.read_config()
        pem = self._service_pem or config.get("servicePublicKey")
        if pem is None:
            raise ConfigError(
                "no service public key: no worker has published"
                f" {self.store.names.config} yet (is the prefix right?)"
            )
        key = load_public_key(pem)
        if self.kid is not None and kid_of(key) != self.kid:
            raise ConfigError("the service public key does not match the pinned kid")
        if self._shards is None:
            self._shards = int(config.get("shards", "1"))
        self._service_key = key
        return key

    async def shards(self) -> int:
        """The number of request shards (from ``P:config`` unless given)."""
        if self._shards is None:
            config = await self.store.read_config()
            self._shards = int(config.get("shards", "1"))
        return self._shards

    async def handshake(self, *, ttl_s: int = 3600, timeout: float = 30.0) -> SessionGrant:
        """Run the protocol's handshake and return the new session's grant."""
        service = await self.service_key()
        sid, mid = new_id(), new_id()
        kb = os.urandom(KEY_SIZE)
        ec_private, ec = x25519_keypair()
        body = {"clientEphemeral": wire.to_wire_binary(ec, self.encoding), "ttl": ttl_s}
        out = messages.seal_request(
            field=self.encoding,
            alg=ALG_RSA,
            sid=sid,
            mid=mid,
            ts=_now_ms(),
            type_=HANDSHAKE_TYPE,
            plaintext=wire.dumps(body, self.encoding),
            public_key=service,
            kid=kid_of(service),
            key=kb,
        )
        await self._send(out.request)
        reply = await self._await_one(sid, mid, timeout)
        result = _resolve(reply, out, HANDSHAKE_TYPE)
        value = result.unwrap()
        try:
            if not isinstance(value, dict) or value.get("sessionId") != sid:
                raise Malformed("handshake reply is not for this session")
            ew = wire.binary(value["serverEphemeral"], self.encoding)
            ks = handshake_session_key(
                kb=kb,
                shared=x25519_shared(ec_private, ew),
                sid=sid,
                client_ephemeral=ec,
                worker_ephemeral=ew,
            )
            pem = value["publicKey"]
            load_public_key(pem, what="session public key")
            return SessionGrant(
                sid=sid, public_key_pem=pem, session_key=ks, expires_at=int(value["expiresAt"])
            )
        except (KeyError, TypeError, ValueError, wire.DecodeError):
            raise Malformed("the handshake reply is not the protocol's") from None

    @contextlib.asynccontextmanager
    async def session(
        self,
        grant: SessionGrant | None = None,
        *,
        alg: str = ALG_SK,
        ttl_s: int = 3600,
        timeout: float = 30.0,
        max_in_flight: int = 500,
    ) -> AsyncIterator[ClientSession]:
        """Open a session (handshake unless ``grant`` is given) with its reply reader.

        At most ``max_in_flight`` requests wait for replies at once; ``submit`` and
        ``request`` wait for a free slot (``request`` within its timeout). Keep it
        below the workers' ``SEALSTREAM_REPLY_MAXLEN`` (1,000).
        """
        if alg not in ALGORITHMS:
            raise ValueError(f"alg must be one of {sorted(ALGORITHMS)}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if grant is None:
            grant = await self.handshake(ttl_s=ttl_s, timeout=timeout)
        session = ClientSession(self, grant, alg=alg, max_in_flight=max_in_flight)
        with session._results_in, session._results_out:
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(session._read_replies)
                    try:
                        yield session
                    finally:
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The reader never fails on its own (it rides out Redis outages), so a
                # lone exception is the caller's: give it back unwrapped.
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise

    # -- internals -----------------------------------------------------------------

    async def _send(self, request: wire.Request) -> str:
        shard = self.store.names.default_shard(request.mid, await self.shards())
        entry = wire.encode_request(request)
        # Retried through a Redis blip. Safe: should a lost answer hide an entry that
        # was added, the copy gets a ``replay`` notice, which the session ignores.
        return await self._retry(lambda: self.store.add_request(shard, entry))

    async def _await_one(self, sid: str, mid: str, timeout: float) -> wire.Reply:
        after = "0-0"
        with anyio.move_on_after(timeout):
            while True:
                for entry in await self.store.read_replies(sid, after=after, block_ms=1000):
                    after = entry.id
                    try:
                        reply = wire.decode_reply(entry.fields)
                    except Malformed:
                        continue
                    if reply.sid == sid and reply.mid == mid and not _copy_refused(reply):
                        return reply
        raise ReplyTimeout("no handshake reply", message_id=mid)


class ClientSession:
    """An open session: send requests, receive their replies."""

    def __init__(
        self, client: Client, grant: SessionGrant, *, alg: str, max_in_flight: int
    ) -> None:
        self.client = client
        self.grant = grant
        self.sid = grant.sid
        self.alg = alg
        self._public_key = load_public_key(grant.public_key_pem, what="session public key")
        self._waiters: dict[str, _Waiter] = {}
        # Replies wait in a stream the workers trim to ~1,000 entries; more requests
        # in flight than that could see their replies trimmed before they are read.
        self._slots = anyio.Semaphore(max_in_flight)
        send: MemoryObjectSendStream[Result]
        recv: MemoryObjectReceiveStream[Result]
        send, recv = anyio.create_memory_object_stream[Result](math.inf)
        self._results_in, self._results_out = send, recv

    async def submit(
        self,
        type_: str,
        payload: Any,
        *,
        alg: str | None = None,
        encoding: wire.Field | None = None,
    ) -> str:
        """Send a request whose reply will come from :meth:`replies`; return its mid."""
        waiter = await self._send(type_, payload, alg=alg, encoding=encoding, streamed=True)
        return waiter.outgoing.request.mid

    async def request(
        self,
        type_: str,
        payload: Any,
        *,
        timeout: float = 30.0,
        alg: str | None = None,
        encoding: wire.Field | None = None,
    ) -> Any:
        """Send a request and return its result.

        Raises :class:`RemoteError` for an ``error`` reply, :class:`RequestRejected`
        for a notice, :class:`ReplyTimeout` when nothing comes within ``timeout``.
        """
        waiter: _Waiter | None = None
        try:
            # One deadline for sending (through a Redis outage, say) and the reply.
            with anyio.fail_after(timeout):
                waiter = await self._send(
                    type_, payload, alg=alg, encoding=encoding, streamed=False
                )
                await waiter.done.wait()
        except TimeoutError:
            mid = waiter.outgoing.request.mid if waiter is not None else None
            raise ReplyTimeout(f"no reply within {timeout:g} s", message_id=mid) from None
        finally:
            if waiter is not None:
                self._forget(waiter.outgoing.request.mid)
        assert waiter.result is not None
        return waiter.result.unwrap()

    async def replies(self) -> AsyncIterator[Result]:
        """Results of submitted requests, in the order their replies arrive."""
        async for result in self._results_out:
            yield result

    @property
    def outstanding(self) -> int:
        """Requests sent whose reply has not arrived."""
        return len(self._waiters)

    async def _send(
        self,
        type_: str,
        payload: Any,
        *,
        alg: str | None,
        encoding: wire.Field | None,
        streamed: bool,
    ) -> _Waiter:
        alg = alg or self.alg
        field_ = encoding or self.client.encoding
        if alg not in ALGORITHMS:
            raise ValueError(f"alg must be one of {sorted(ALGORITHMS)}")
        if not wire.is_type(type_):
            raise ValueError("type must match [A-Za-z0-9_.:-]{1,64}")
        plaintext = wire.dumps(payload, field_)
        # Wait for a slot first, so ``ts`` is taken when the request really goes out.
        await self._slots.acquire()
        try:
            out = messages.seal_request(
                field=field_,
                alg=alg,
                sid=self.sid,
                mid=new_id(),
                ts=_now_ms(),
                type_=type_,
                plaintext=plaintext,
                public_key=self._public_key if alg == ALG_RSA else None,
                ks=self.grant.session_key if alg == ALG_SK else None,
            )
        except BaseException:
            self._slots.release()
            raise
        waiter = _Waiter(outgoing=out, type=type_, streamed=streamed)
        self._waiters[out.request.mid] = waiter
        try:
            await self.client._send(out.request)
        except BaseException:
            self._forget(out.request.mid)
            raise
        return waiter

    def _forget(self, mid: str) -> None:
        """Stop waiting for ``mid`` (its slot is free again)."""
        if self._waiters.pop(mid, None) is not None:
            self._slots.release()

    async def _read_replies(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        store, after, retry = self.client.store, "0-0", Retrier()
        task_status.started()
        while True:
            entries = await retry(partial(store.read_replies, self.sid, after=after, block_ms=1000))
            for entry in entries:
                after = entry.id
                try:
                    reply = wire.decode_reply(entry.fields)
                except Malformed:
                    log.warning("reply_malformed", session_id=self.sid)
                    continue
                waiter = self._waiters.get(reply.mid)
                if waiter is None or reply.sid != self.sid or _copy_refused(reply):
                    continue
                try:
                    result = _resolve(reply, waiter.outgoing, waiter.type)
                except DecryptError:
                    log.warning("reply_unauthentic", session_id=self.sid, message_id=reply.mid)
                    continue
                waiter.result = result
                if waiter.streamed:
                    self._forget(reply.mid)
                    self._results_in.send_nowait(result)
                waiter.done.set()


def _copy_refused(reply: wire.Reply) -> bool:
    """A ``replay`` notice for a mid we sent once refers to a copy of our entry.

    Our own entry was (or will be) answered, so the notice is no reason to stop
    waiting: it would otherwise let anyone who can add entries cancel our requests.
    """
    return reply.status == "rejected" and reply.code == "replay"


def _resolve(reply: wire.Reply, out: messages.Outgoing, type_: str) -> Result:
    """Authenticate and decode a reply to ``out``; DecryptError if it is not genuine."""
    mid = out.request.mid
    if reply.status == "rejected":
        return Result(mid=mid, type=type_, status="rejected", code=reply.code)
    plaintext = messages.open_reply(reply, reply_key=out.reply_key, request=out.request)
    try:
        value = wire.loads(plaintext, out.request.field)
    except wire.DecodeError:
        raise DecryptError("cannot open") from None
    if reply.status == "error":
        if not isinstance(value, dict):
            raise DecryptError("cannot open")
        return Result(
            mid=mid,
            type=type_,
            status="error",
            code=str(value.get("code")),
            message=str(value.get("message")),
        )
    return Result(mid=mid, type=type_, status="ok", value=value)
