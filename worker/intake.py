"""Intake: the batch path from stream entries to claimed jobs.

::

    Delivery batch -> decode and admit (wire.decode_request: size and shape; the
      delivery limit; freshness) -> sessions (one MGET per batch, SessionCache)
      -> envelopes.open_request (SK on the loop; RSA unwraps in child processes,
         worker.unwrapping, or threads, in chunks of 16)
      -> freshness again -> replay records (the CLAIM script, one call per batch)
      -> Job -> Handling.run_here

Handshakes come out of :meth:`Intake.process` after decoding, for their own lane
(:mod:`worker.handshake_lane`, which claims through :meth:`Intake.claimed` too).
Every refusal goes to the writer (:meth:`Writer.refuse`); nothing here raises for
bad input.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel

from worker import envelopes, wire
from worker import tracing as _tracing
from worker.attempts import AttemptLog
from worker.dispatch import Dispatcher
from worker.errors import (
    AuthFailed,
    DecryptError,
    DeliveryLimit,
    Expired,
    Malformed,
    ProtocolError,
    Replay,
    SessionInvalid,
)
from worker.handlers import App
from worker.handling import Handling
from worker.inflight import (
    YIELD_S,
    Clock,
    Delivery,
    Job,
    PendingWrite,
    Stats,
    fill_context,
    with_context,
)
from worker.keys import MasterKeys
from worker.logging import get_logger
from worker.metrics import Metrics
from worker.protocol import ALG_RSA
from worker.sessions import Session, open_record
from worker.settings import Settings
from worker.streams import AckWrite, Claim, Retrier, Store
from worker.unwrapping import UnwrapPool
from worker.writer import Writer

log = get_logger("sealstream.worker")
_SEEN_MARGIN_MS = 60_000
#: RSA unwraps per thread hop.
_RSA_CHUNK = 16

_Authed = tuple[Delivery, wire.Request, envelopes.Opened]


#: an opened session and the SHA-1 (hex) of the record it was opened from
Known = tuple[Session, str]

#: a request for the second pass, with the digest of the cached session's record it
#: failed with (None: it opened, but the claim found the record changed)
_Doubt = tuple[Delivery, wire.Request, str | None]


class SessionCache:
    """Opened sessions by sid (the ``size`` used last), with their record's digest.

    A session's key never changes for its sid, and its expiry is inside the record,
    so a cached session stays right while its record is unchanged: the CLAIM script
    sets a request's replay record only while the session record's SHA-1 is the
    digest the worker opened (a record revoked, expired, re-sealed or tampered with
    sends the request back to read it again). A sid is served from here without
    reading its record; :meth:`open` re-opens a record whose bytes changed.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._items: OrderedDict[str, tuple[bytes, Known]] = OrderedDict()

    def known(self, sid: str) -> Known | None:
        """The cached session of ``sid`` and its record's digest, if any."""
        hit = self._items.get(sid)
        if hit is None:
            return None
        self._items.move_to_end(sid)
        return hit[1]

    def forget(self, sid: str) -> None:
        """Drop ``sid`` (its record is gone or fails to open)."""
        self._items.pop(sid, None)

    def clear(self) -> None:
        """Drop every session (the master keys changed: a record may no longer open)."""
        self._items.clear()

    def open(self, sid: str, raw: bytes, keks: MasterKeys) -> Known:
        """The session for this record (cached); DecryptError when it fails to open."""
        hit = self._items.get(sid)
        if hit is not None and hit[0] == raw:
            self._items.move_to_end(sid)
            return hit[1]
        # A change detector, matched by Lua's redis.sha1hex (the only hash scripts
        # have); no security rests on it: a record that is not the one opened is
        # never used, only read again.
        digest = hashlib.sha1(raw, usedforsecurity=False).hexdigest()
        known = (open_record(sid, raw, keks), digest)
        self._items[sid] = (raw, known)
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return known


class Intake:
    """Takes batches of deliveries as far as their handlers."""

    def __init__(
        self,
        *,
        store: Store,
        app: App,
        settings: Settings,
        master_keys: MasterKeys,
        clock: Clock,
        retry: Retrier,
        metrics: Metrics,
        stats: Stats,
        dispatcher: Dispatcher,
        attempts: AttemptLog,
        handling: Handling,
        writer: Writer,
        unwraps: UnwrapPool | None = None,
        tracing: _tracing.Tracing | None = None,
    ) -> None:
        self.store = store
        self.unwraps = unwraps or UnwrapPool(0)
        self.tracing = tracing
        self.retry = retry
        self.metrics = metrics
        self.app = app
        self.settings = settings
        self.sessions = SessionCache()
        self._master_keys = master_keys
        self.clock = clock
        self.stats = stats
        self.dispatcher = dispatcher
        self.attempts = attempts
        self._run_here = handling.run_here
        self._refuse = writer.refuse
        self._write = writer.write
        self._rsa = anyio.CapacityLimiter(os.cpu_count() or 2)

    @property
    def master_keys(self) -> MasterKeys:
        """The master keys session records are opened with."""
        return self._master_keys

    @master_keys.setter
    def master_keys(self, master_keys: MasterKeys) -> None:
        # A key reload: a cached session was opened under the old ring, and its record
        # may not open under the new one (a KEK retired): open every record again.
        self._master_keys = master_keys
        self.sessions.clear()

    async def process(self, batch: Sequence[Delivery]) -> list[tuple[Delivery, wire.Request]]:
        """Take a batch as far as its handlers; refuse the rest. Returns its handshakes,
        for the lane (after the batch's ordinary requests)."""
        now = self.clock()
        ordinary: list[tuple[Delivery, wire.Request]] = []
        handshakes: list[tuple[Delivery, wire.Request]] = []
        tick = time.perf_counter()
        for d in batch:
            if time.perf_counter() - tick > YIELD_S:
                await anyio.lowlevel.checkpoint()
                tick = time.perf_counter()
            try:
                request = self._admit(d, now)
            except ProtocolError as exc:
                self._refuse(d, exc)
                continue
            (handshakes if request.is_handshake else ordinary).append((d, request))
        if ordinary:
            await self._authenticate([(d, r, None) for d, r in ordinary])
        return handshakes

    def _admit(self, d: Delivery, now: int) -> wire.Request:
        """Decode and validate before any crypto; ProtocolError with what context there is."""
        try:
            request = _decode(d.entry.fields, self.settings.max_entry_size)
        except ProtocolError as exc:
            if d.attempts > self.settings.delivery_limit:
                raise with_context(DeliveryLimit("delivered too many times"), exc) from None
            raise
        try:
            if d.attempts > self.settings.delivery_limit:
                raise DeliveryLimit("delivered too many times")
            # Freshness by this worker's clock: the entry id is the writer's choice.
            if abs(request.ts - now) > self.settings.replay_window_ms:
                raise Expired("ts is outside the freshness window")
        except ProtocolError as exc:
            fill_context(exc, request)
            raise
        return request

    async def _authenticate(self, batch: Sequence[_Doubt], *, cached: bool = True) -> None:
        """Open the batch's requests with their sessions (cached, or one MGET).

        A request refused with a cached session (expired, the ``encryptedAesKey``
        size, authentication) or whose claim finds its record changed comes back once,
        ``cached=False``: every record is read, since the protocol checks the session
        first (revoked, expired in Redis, replaced: ``session_unknown``). One that
        failed to open with the record read now is refused without the crypto again.
        """
        sessions: dict[str, Known | None] = {}
        unknown: list[str] = []
        for _, r, _ in batch:
            if r.sid not in sessions:
                sessions[r.sid] = known = self.sessions.known(r.sid) if cached else None
                if known is None:
                    unknown.append(r.sid)
        # sid -> the digest of its cached session's record
        from_cache = {sid: known[1] for sid, known in sessions.items() if known is not None}
        if unknown:
            raws = await self.retry(lambda: self.store.get_sessions(unknown))
            for sid, raw in zip(unknown, raws, strict=True):
                sessions[sid] = self._session(sid, raw)
        now = self.clock()
        opened: list[_Authed] = []
        wrapped: list[tuple[Delivery, wire.Request, Session]] = []
        doubtful: list[_Doubt] = []
        for d, r, failed_with in batch:
            try:
                known = sessions[r.sid]
                if known is None:
                    raise SessionInvalid("no session, or its record failed to open")
                session, digest = known
                if session.expired(now):
                    raise SessionInvalid("the session has expired")
                if r.alg == ALG_RSA and (
                    len(r.encrypted_aes_key or b"") != session.wrapped_key_size
                ):
                    raise Malformed("encryptedAesKey is not the session modulus size")
                if digest == failed_with:
                    # The record it failed to open with, unchanged: the same outcome
                    # without the crypto again (a forgery costs one unwrap, as uncached).
                    raise AuthFailed("authentication failed")
                if r.alg == ALG_RSA:
                    wrapped.append((d, r, session))
                else:
                    opened.append((d, r, open_request(r, None, session.ks)))
            except ProtocolError as exc:
                if r.sid in from_cache:
                    doubtful.append((d, r, from_cache[r.sid]))
                else:
                    self._refuse(d, fill_context(exc, r))
        if wrapped:
            # Chunks run in parallel: in the unwrap processes, or in threads
            # (cryptography releases the GIL for RSA).
            async with anyio.create_task_group() as tg:
                for start in range(0, len(wrapped), _RSA_CHUNK):
                    chunk = wrapped[start : start + _RSA_CHUNK]
                    tg.start_soon(self._unwrap, chunk, opened, doubtful, from_cache)
        if opened:
            digests = {sid: known[1] for sid, known in sessions.items() if known is not None}
            changed = await self._claim(opened, digests, recheck=cached)
            doubtful += ((d, r, None) for d, r in changed)
        if doubtful:
            await self._authenticate(doubtful, cached=False)

    async def _unwrap(
        self,
        chunk: list[tuple[Delivery, wire.Request, Session]],
        opened: list[tuple[Delivery, wire.Request, envelopes.Opened]],
        doubtful: list[_Doubt],
        from_cache: Mapping[str, str],
    ) -> None:
        keys = await self.unwraps.unwrap(
            [(s.private_key_der(), r.encrypted_aes_key or b"") for _, r, s in chunk]
        )
        if keys is None:
            results = await anyio.to_thread.run_sync(_open_rsa, chunk, limiter=self._rsa)
        else:
            results = [_open_unwrapped(r, key) for (_, r, _), key in zip(chunk, keys, strict=True)]
        for (d, r, _), result in zip(chunk, results, strict=True):
            if result is not None:
                opened.append((d, r, result))
            elif r.sid in from_cache:
                doubtful.append((d, r, from_cache[r.sid]))
            else:
                self._refuse(d, fill_context(AuthFailed("authentication failed"), r))

    def _session(self, sid: str, raw: bytes | None) -> Known | None:
        if raw is None:
            self.sessions.forget(sid)
            return None
        try:
            return self.sessions.open(sid, raw, self.master_keys)
        except DecryptError:
            self.sessions.forget(sid)
            # No traceback: it would carry the crypto library's text.
            log.error("session_record_invalid", alarm="tamper", session_id=sid)  # noqa: TRY400
            return None

    def seen_ttl(self, request: wire.Request, now: int) -> int:
        # The record outlives the window (a copy stays a replay until it is stale)
        # and the handler's every attempt (the reply is added only while it lives).
        return max(
            request.ts + self.settings.replay_window_ms + _SEEN_MARGIN_MS - now,
            self.dispatcher.budget_ms(request.type) + _SEEN_MARGIN_MS,
        )

    async def _claim(
        self, batch: list[_Authed], digests: dict[str, str], *, recheck: bool
    ) -> list[tuple[Delivery, wire.Request]]:
        """Set the replay records (after authentication: a forgery cannot burn a mid),
        each only while its session record is the one opened (``digests``).

        Returns the requests whose session record changed, to be read again when
        ``recheck``; without it they are ``session_unknown``.
        """
        batch = self._still_fresh(batch)
        now, claimed_at = self.clock(), time.monotonic()
        # seen_ttl of each, with what is the same for the whole batch taken out
        floor = self.settings.replay_window_ms + _SEEN_MARGIN_MS - now
        budget = self.dispatcher.budget_ms
        claims = [
            Claim(
                sid=r.sid,
                mid=r.mid,
                owner=d.owner,
                ttl_ms=max(r.ts + floor, budget(r.type) + _SEEN_MARGIN_MS),
                session_digest=digests[r.sid],
            )
            for d, r, _ in batch
        ]
        prevs = await self.retry(lambda: self.store.claim(claims))
        jobs: list[Job] = []
        resumed: list[Job] = []
        changed: list[tuple[Delivery, wire.Request]] = []
        for (d, r, o), claim, prev in zip(batch, claims, prevs, strict=True):
            try:
                if prev == "?":
                    if recheck:
                        changed.append((d, r))
                        continue
                    raise SessionInvalid("the session record changed or is gone")
                if not self.claimed(d, prev):
                    continue
            except ProtocolError as exc:
                self._refuse(d, fill_context(exc, r))
                continue
            jobs.append(
                Job(
                    delivery=d,
                    request=r,
                    plaintext=o.plaintext,
                    reply_key=o.reply_key,
                    seen_ttl_ms=claim.ttl_ms,
                    claimed_at=claimed_at,
                )
            )
            if self.tracing is not None:
                stream = self.store.names.request_stream(d.shard)
                jobs[-1].span = self.tracing.start(stream, r.mid, r.type)
            if prev is not None and self._retried(r.type):
                resumed.append(jobs[-1])
        if resumed:
            # Redeliveries of requests with retries: go on from their recorded attempt.
            ids = [(j.request.sid, j.request.mid) for j in resumed]
            for job, attempt in zip(resumed, await self.attempts.load(ids), strict=True):
                job.first_attempt = attempt
        if jobs:
            await self._run_here(jobs)
        return changed

    def _still_fresh(self, batch: list[_Authed]) -> list[_Authed]:
        """The entries still fresh by the clock *now*, right before their records are
        set: the batch may have waited (an outage, the RSA threads) since it was read,
        and a record only outlives ts + window + 60 s."""
        now = self.clock()
        window = self.settings.replay_window_ms
        fresh = []
        for item in batch:
            d, r, _ = item
            if abs(r.ts - now) > window:
                self._refuse(d, fill_context(Expired("ts is outside the freshness window"), r))
            else:
                fresh.append(item)
        return fresh

    def _retried(self, type_: str) -> bool:
        spec = self.app.get(type_)
        return spec is not None and spec.policy.retries > 0

    def claimed(self, d: Delivery, prev: str | None) -> bool:
        """Whether to run the entry given its record's previous value; Replay if not ours."""
        if prev is None:
            return True
        if prev == d.owner:
            log.info("redelivery", entry_id=d.entry.id, shard=d.shard)
            return True
        if prev == d.owner + "|done":
            log.info("redelivery_already_answered", entry_id=d.entry.id, shard=d.shard)
            self.stats.redelivered_done += 1
            self.metrics.redelivered_done.inc()
            self._write(
                PendingWrite(delivery=d, write=AckWrite(shard=d.shard, entry_id=d.entry.id))
            )
            return False
        raise Replay("the mid was already used by another entry")


def _decode(fields: dict[bytes, bytes], max_size: int) -> wire.Request:
    """Decode; any unexpected failure is Malformed, so no input bypasses the
    notice/dead-letter path (it would stay pending and block trimming)."""
    try:
        return wire.decode_request(fields, max_size=max_size)
    except ProtocolError:
        raise
    except Exception as exc:
        log.error("decode_bug", error_type=type(exc).__name__)  # noqa: TRY400
        raise Malformed("the entry could not be decoded") from None


def open_request(request: wire.Request, private_key: Any, ks: bytes | None) -> envelopes.Opened:
    """``envelopes.open_request``; any failure to open is AuthFailed."""
    try:
        return envelopes.open_request(request, private_key=private_key, ks=ks)
    except DecryptError:
        raise AuthFailed("authentication failed") from None


def _open_unwrapped(request: wire.Request, key: bytes) -> envelopes.Opened | None:
    """The payload of a request whose key a child process unwrapped (None: it fails)."""
    try:
        return envelopes.open_unwrapped(request, key)
    except DecryptError:
        return None


def _open_rsa(
    chunk: list[tuple[Delivery, wire.Request, Session]],
) -> list[envelopes.Opened | None]:
    """RSA unwraps of a chunk, in one thread hop (cryptography releases the GIL)."""
    out: list[envelopes.Opened | None] = []
    for _, request, session in chunk:
        try:
            out.append(envelopes.open_request(request, private_key=session.private_key))
        except DecryptError:
            out.append(None)
    return out
