"""The handshake lane: handshakes, apart from the batch path's ordinary requests.

::

    (Delivery, Request) parked by the processor after its batch's ordinary requests
      -> bounded stream (HANDSHAKE_BACKLOG; the entry's processing slot given back)
      -> handshake_loop x SEALSTREAM_HANDSHAKE_CONCURRENCY: service-key unwrap in the
         key pool's threads -> freshness again -> replay record (Intake.claimed)
      -> handshake.accept / handshake.answer (a key pair made ahead, KeyPool.take)
      -> Handling.reply (the reply and the new session record) -> writer

The unwrap and the session's key generation run in :class:`~worker.keypool.KeyPool`'s
own threads, at the lowest CPU priority, so a flood of handshakes takes neither the
slots nor the threads of ordinary requests (nor much of their CPU). The writer
creates the session record in the reply's FINISH step.
"""

from __future__ import annotations

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from cryptography.hazmat.primitives.asymmetric import rsa

from worker import handshake, wire
from worker.dispatch import Outcome, error
from worker.errors import AuthFailed, BadPayload, Expired, Malformed, ProtocolError, SessionExists
from worker.handling import Handling
from worker.inflight import Clock, Delivery, Tracker, fill_context
from worker.intake import Intake, open_request
from worker.keypool import KeyPool
from worker.keys import ServiceKey
from worker.logging import get_logger
from worker.settings import Settings
from worker.streams import Claim, Retrier, Store
from worker.writer import Writer

log = get_logger("sealstream.worker")
#: Handshakes parked per worker waiting for the lane; past it the reader waits too.
HANDSHAKE_BACKLOG = 1024

_Parked = tuple[Delivery, wire.Request]


class HandshakeLane:
    """Serves parked handshakes. Run :meth:`open` in the event loop before the first
    is parked, then :meth:`handshake_loop` tasks."""

    def __init__(
        self,
        *,
        store: Store,
        settings: Settings,
        service_keys: dict[str, ServiceKey],
        keys: KeyPool,
        tracker: Tracker,
        clock: Clock,
        retry: Retrier,
        intake: Intake,
        handling: Handling,
        writer: Writer,
    ) -> None:
        self.store = store
        self.settings = settings
        #: by kid; the runtime replaces its contents in place on a key reload
        self.service_keys = service_keys
        self.keys = keys
        self.tracker = tracker
        self.clock = clock
        self.retry = retry
        self._seen_ttl = intake.seen_ttl
        self._claimed = intake.claimed
        self._reply = handling.reply
        self._refuse = writer.refuse

    def open(self) -> tuple[MemoryObjectSendStream[_Parked], MemoryObjectReceiveStream[_Parked]]:
        """The lane's bounded stream, for the caller to close."""
        self._handshakes = anyio.create_memory_object_stream[_Parked](HANDSHAKE_BACKLOG)
        return self._handshakes

    async def park(self, d: Delivery, request: wire.Request) -> None:
        """Queue a handshake for the lane (waiting while it is full) and free its slot."""
        send = self._handshakes[0]
        try:
            send.send_nowait((d, request))
        except anyio.WouldBlock:
            # The lane is full: hold the slot meanwhile, and read no further ahead
            # (the reader waiting for slots now is the lane's doing).
            self.tracker.handlers_busy()
            await send.send((d, request))
        d.handed = True
        self.tracker.parked(d)

    async def handshake_loop(self) -> None:
        """Serve parked handshakes until cancelled."""
        async for d, request in self._handshakes[1]:
            try:
                await self._handshake(d, request)
            except ProtocolError as exc:
                self._refuse(d, fill_context(exc, request))
            except Exception:
                log.exception("entry_failed", entry_id=d.entry.id)
                self.tracker.done(d)

    async def _handshake(self, d: Delivery, request: wire.Request) -> None:
        service = self.service_keys.get(request.kid or "")
        if service is None:
            raise AuthFailed("unknown kid")
        if len(request.encrypted_aes_key or b"") != service.wrapped_key_size:
            raise Malformed("encryptedAesKey is not the service modulus size")
        opened = await self.keys.call(open_request, request, service.private_key, None)
        if abs(request.ts - self.clock()) > self.settings.replay_window_ms:
            raise Expired("ts is outside the freshness window")  # it waited in the lane
        claim = Claim(
            sid=request.sid,
            mid=request.mid,
            owner=d.owner,
            ttl_ms=self._seen_ttl(request, self.clock()),
        )
        (prev,) = await self.retry(lambda: self.store.claim([claim]))
        if not self._claimed(d, prev):
            return
        if await self.retry(lambda: self.store.session_exists(request.sid)):
            raise SessionExists("a session already exists for this sid")
        try:
            accepted = handshake.accept(request, opened, max_ttl_s=self.settings.session_max_ttl_s)
        except BadPayload as exc:
            outcome = error("bad_payload", exc.message, request.field)
            self._reply(d, request, opened.reply_key, outcome, seen_ttl_ms=claim.ttl_ms)
            return
        key: rsa.RSAPrivateKey = await self.keys.take()
        answer = handshake.answer(
            request,
            accepted,
            private_key=key,
            now_ms=self.clock(),
            max_ttl_s=self.settings.session_max_ttl_s,
        )
        outcome = Outcome(status="ok", plaintext=answer.plaintext)
        self._reply(
            d, request, opened.reply_key, outcome, seen_ttl_ms=claim.ttl_ms, session=answer.session
        )
