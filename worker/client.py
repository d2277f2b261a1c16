"""The Python client: pin the service key, handshake, send requests, await replies.

::

    async with Client.from_url(url, kid=PINNED_KID) as client:
        async with client.session() as session:          # handshake; reader running
            result = await session.request("echo", {"x": 1})

One reader task per session reads the reply stream and hands each reply to the
waiter with its ``mid``; replies to :meth:`ClientSession.submit` go to
:meth:`ClientSession.replies`, and a sweeper task gives each submitted request
that outlives its timeout a ``timeout`` result there.

Notices (``rejected``) are unauthenticated: anyone who can write to Redis can
forge one. An authenticated reply therefore always wins over a notice for the
same ``mid`` read in the same batch, and a notice never replaces a result.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from cryptography.hazmat.primitives.asymmetric import rsa
from redis.exceptions import RedisError

from worker import codec, envelopes, handshake, wire
from worker.cluster import initial_client, probed, store_for
from worker.crypto import kid_of
from worker.errors import ConfigError, DecryptError, ReplyTimeout
from worker.handshake import SessionGrant
from worker.keys import load_public_key
from worker.keyspace import Names
from worker.logging import get_logger
from worker.protocol import ALG_RSA, ALG_SK, ALGORITHMS, HANDSHAKE_TYPE, new_id, now_ms
from worker.replies import Result, batch, copy_refused, resolve
from worker.shards import MAX_SHARDS, SHARDS_REFRESH_S, parse_shards
from worker.streams import AnyRedis, Retrier

log = get_logger("sealstream.client")

__all__ = ["MAX_SHARDS", "Client", "ClientSession", "Result", "SessionGrant"]


@dataclass(slots=True, kw_only=True)
class _Waiter:
    outgoing: envelopes.Outgoing
    type: str
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Result | None = None
    streamed: bool = False
    deadline: float = math.inf  # anyio clock; submitted requests only


class Client:
    """A producer/consumer of encrypted requests over one Redis connection pool.

    Pin the service key by ``kid`` (checked against ``P:config``), or pass the
    public key itself (``service_public_key``, PEM), or both.
    """

    def __init__(
        self,
        redis: AnyRedis,
        *,
        kid: str | None = None,
        service_public_key: str | bytes | None = None,
        prefix: str = "sealstream",
        encoding: wire.Field = "e",
        shards: int | None = None,
    ) -> None:
        if kid is None and service_public_key is None:
            raise ConfigError("Client needs the pinned service kid or service public key")
        if shards is not None and not 1 <= shards <= MAX_SHARDS:
            raise ConfigError(f"Client shards: expected 1..{MAX_SHARDS}, got {shards}")
        self.store = store_for(redis, Names(prefix))
        self._retry = Retrier()
        self.kid = kid
        self.encoding = encoding
        self._service_pem = service_public_key
        self._service_key: rsa.RSAPublicKey | None = None
        self._shards = shards
        self._pinned_shards = shards is not None
        self._read_at = -math.inf
        self._owned = False
        self._probe: tuple[str, str] | None = None

    @classmethod
    def from_url(cls, url: str, *, cluster: str = "auto", **kwargs: Any) -> Client:
        """A client with its own connection pool (closed by ``async with``): one server,
        any node of a Redis Cluster (``async with`` asks it; ``cluster="yes"|"no"``
        forces it) or a Sentinel URL (``redis+sentinel://host:port[,...]/service``)."""
        client = cls(initial_client(url, cluster=cluster), **kwargs)
        client._owned = True
        client._probe = (url, cluster)
        return client

    async def __aenter__(self) -> Client:
        if self._probe is not None:
            url, mode = self._probe
            self._probe = None
            self.store = await probed(self.store, url, mode)
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
            self._shards = parse_shards(config, self.store.names)
            self._read_at = time.monotonic()
        self._service_key = key
        return key

    async def shards(self) -> int:
        """The number of request shards (from ``P:config`` unless given), read again
        every ``SHARDS_REFRESH_S`` s to see shards added (``sealstream shards set``).

        Raises :class:`ConfigError` when ``P:config`` holds anything but an integer
        1..1024 (Redis may be written by anyone; a bad value must not reach ``%``).
        """
        if self._shards is None:
            return await self.refresh_shards()
        if not self._pinned_shards and time.monotonic() - self._read_at > SHARDS_REFRESH_S:
            # Best effort: through an outage (or a bad value) the count we have is
            # used, and the send itself is retried.
            with anyio.move_on_after(1.0), contextlib.suppress(RedisError, OSError, ConfigError):
                await self.refresh_shards()
        return self._shards

    async def refresh_shards(self) -> int:
        """Read ``shards`` from ``P:config`` now (a count given to the client is kept)."""
        if self._shards is None or not self._pinned_shards:
            self._shards = parse_shards(await self.store.read_config(), self.store.names)
            self._read_at = time.monotonic()
        return self._shards

    async def handshake(self, *, ttl_s: int = 3600, timeout: float = 30.0) -> SessionGrant:
        """Run the protocol's handshake and return the new session's grant."""
        service = await self.service_key()
        sent = handshake.hello(service, field=self.encoding, now_ms=now_ms(), ttl_s=ttl_s)
        await self._send(sent.request)
        value = (await self._await_handshake(sent.outgoing, timeout)).unwrap()
        return handshake.finish(sent, value)

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
                    await tg.start(session._expire_submitted)
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

    async def _await_handshake(self, out: envelopes.Outgoing, timeout: float) -> Result:
        """The handshake's result; a reply that fails to open is ignored, as a forgery."""
        sid, mid = out.request.sid, out.request.mid
        after = "0-0"
        with anyio.move_on_after(timeout):
            while True:
                read = partial(self.store.read_replies, sid, after=after, block_ms=1000)
                entries = await self._retry(read)
                after = entries[-1].id if entries else after
                for reply in batch(entries, sid):
                    if reply.mid != mid or copy_refused(reply):
                        continue
                    try:
                        # Sealed replies come first in a batch: a notice is used only
                        # when none of them opened.
                        return resolve(reply, out, HANDSHAKE_TYPE)
                    except DecryptError:
                        log.warning("reply_unauthentic", session_id=sid, message_id=mid)
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
        # A submitted request's result keeps its slot until replies() hands it out, so
        # results queued + requests outstanding <= max_in_flight: the queue is bounded
        # and adding to it never blocks (the reader and sweeper use send_nowait).
        send: MemoryObjectSendStream[Result]
        recv: MemoryObjectReceiveStream[Result]
        send, recv = anyio.create_memory_object_stream[Result](max_in_flight)
        self._results_in, self._results_out = send, recv
        # (deadline, mid) of submitted requests; entries of answered ones are skipped.
        self._deadlines: list[tuple[float, str]] = []
        self._deadlines_changed = anyio.Event()

    async def submit(
        self,
        type_: str,
        payload: Any,
        *,
        timeout: float = 30.0,
        alg: str | None = None,
        encoding: wire.Field | None = None,
    ) -> str:
        """Send a request whose result will come from :meth:`replies`; return its mid.

        Waits for a free slot first (while ``max_in_flight`` requests are outstanding
        or their results not yet taken from :meth:`replies`). ``timeout`` then covers
        sending (through a Redis outage) and the reply: when it passes, the result
        is a :class:`Result` with ``status="timeout"``.
        """
        waiter = await self._send(
            type_, payload, alg=alg, encoding=encoding, streamed=True, timeout=timeout
        )
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
                    type_, payload, alg=alg, encoding=encoding, streamed=False, timeout=math.inf
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
        """Results of submitted requests, in the order they arrive (or time out).

        Taking a result frees its request's slot.
        """
        async for result in self._results_out:
            self._slots.release()
            yield result

    @property
    def outstanding(self) -> int:
        """Requests sent whose reply has not arrived (nor their timeout passed)."""
        return len(self._waiters)

    async def _send(
        self,
        type_: str,
        payload: Any,
        *,
        alg: str | None,
        encoding: wire.Field | None,
        streamed: bool,
        timeout: float,
    ) -> _Waiter:
        alg = alg or self.alg
        field_ = encoding or self.client.encoding
        if alg not in ALGORITHMS:
            raise ValueError(f"alg must be one of {sorted(ALGORITHMS)}")
        if not wire.is_type(type_):
            raise ValueError("type must match [A-Za-z0-9_.:-]{1,64}")
        plaintext = codec.dumps(payload, field_)
        # Wait for a slot first, so ``ts`` is taken when the request really goes out.
        await self._slots.acquire()
        try:
            out = envelopes.seal_request(
                field=field_,
                alg=alg,
                sid=self.sid,
                mid=new_id(),
                ts=now_ms(),
                type_=type_,
                plaintext=plaintext,
                public_key=self._public_key if alg == ALG_RSA else None,
                ks=self.grant.session_key if alg == ALG_SK else None,
            )
        except BaseException:
            self._slots.release()
            raise
        mid = out.request.mid
        waiter = _Waiter(outgoing=out, type=type_, streamed=streamed)
        self._waiters[mid] = waiter
        if streamed:
            waiter.deadline = anyio.current_time() + timeout
            if not self._deadlines or waiter.deadline < self._deadlines[0][0]:
                self._deadlines_changed.set()
            heapq.heappush(self._deadlines, (waiter.deadline, mid))
        try:
            # A submitted request whose send outlives its timeout gets its ``timeout``
            # result from the sweeper, like one whose reply never came.
            with anyio.move_on_after(waiter.deadline - anyio.current_time()):
                await self.client._send(out.request)
        except BaseException:
            self._forget(mid)
            raise
        return waiter

    def _forget(self, mid: str) -> None:
        """Stop waiting for ``mid`` (its slot is free again)."""
        if self._waiters.pop(mid, None) is not None:
            self._slots.release()

    def _settle(self, waiter: _Waiter, result: Result) -> None:
        """Give ``waiter`` its result; a submitted request's goes to :meth:`replies`."""
        waiter.result = result
        if waiter.streamed:
            # The slot now belongs to the queued result (released when it is taken).
            del self._waiters[result.mid]
            self._results_in.send_nowait(result)
        waiter.done.set()

    async def _read_replies(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        store, after, retry = self.client.store, "0-0", Retrier()
        task_status.started()
        while True:
            entries = await retry(partial(store.read_replies, self.sid, after=after, block_ms=1000))
            after = entries[-1].id if entries else after
            for reply in batch(entries, self.sid):
                waiter = self._waiters.get(reply.mid)
                if waiter is None or copy_refused(reply):
                    continue
                # Sealed replies come first in a batch. A notice never replaces a
                # result; a genuine reply replaces a notice request() has not taken.
                if waiter.result is not None and (
                    reply.status == "rejected" or waiter.result.status != "rejected"
                ):
                    continue
                try:
                    result = resolve(reply, waiter.outgoing, waiter.type)
                except DecryptError:
                    log.warning("reply_unauthentic", session_id=self.sid, message_id=reply.mid)
                    continue
                self._settle(waiter, result)

    async def _expire_submitted(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Give each submitted request still unanswered at its deadline a timeout result."""
        task_status.started()
        while True:
            now = anyio.current_time()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, mid = heapq.heappop(self._deadlines)
                waiter = self._waiters.get(mid)
                if waiter is not None and waiter.deadline <= now:
                    self._settle(waiter, Result(mid=mid, type=waiter.type, status="timeout"))
            if len(self._deadlines) > 2 * len(self._waiters) + 64:
                # Drop the entries of requests answered long before their deadline.
                self._deadlines = [(w.deadline, m) for m, w in self._waiters.items() if w.streamed]
                heapq.heapify(self._deadlines)
            next_due = self._deadlines[0][0] if self._deadlines else math.inf
            self._deadlines_changed = anyio.Event()
            with anyio.move_on_after(next_due - now):
                await self._deadlines_changed.wait()
