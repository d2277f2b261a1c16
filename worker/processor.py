"""The worker's data path, a batch of stream entries at a time.

::

    entries -> wire.decode_request -> freshness -> sessions (one MGET per batch)
      -> envelopes.open_request (SK on the loop; RSA in threads, in chunks)
      -> replay records (one script per batch) -> handler pool -> envelopes.seal_reply
      -> writer: reply + record done + XACK (one script per flush of many messages)

Handshakes leave the batch after decoding for their own lane (bounded key
generation, :mod:`worker.keypool`), so a flood of them never takes the slots or
threads of ordinary requests. Every refusal sends a notice (when ``sid`` and ``mid``
are well formed), writes a dead letter, then acknowledges. Nothing here raises for
bad input; Redis outages are waited out by the retrier.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus
from cryptography.hazmat.primitives.asymmetric import rsa
from redis.exceptions import ResponseError

from worker import envelopes, handshake, wire
from worker import tracing as _tracing
from worker.attempts import AttemptLog, start_attempt
from worker.dispatch import Dispatcher, Outcome, Work, error, resume
from worker.errors import (
    AuthFailed,
    BadPayload,
    DecryptError,
    DeliveryLimit,
    Expired,
    Malformed,
    ProtocolError,
    Replay,
    SessionExists,
    SessionInvalid,
)
from worker.handlers import App, Context
from worker.keypool import KeyPool
from worker.keys import MasterKeys, ServiceKey
from worker.logging import enabled as log_enabled
from worker.logging import get_logger
from worker.metrics import Metrics
from worker.protocol import ALG_RSA, HANDSHAKE_TYPE, now_ms
from worker.sessions import Session, open_record, seal_record
from worker.settings import Settings
from worker.streams import (
    AckWrite,
    Claim,
    Entry,
    RefusalWrite,
    ReplyWrite,
    Retrier,
    Store,
    Write,
)

log = get_logger("sealstream.worker")
Clock = Callable[[], int]
_SEEN_MARGIN_MS = 60_000
#: Handshakes parked per worker waiting for the lane; past it the reader waits too.
HANDSHAKE_BACKLOG = 1024
#: Messages per writer script call, and RSA unwraps per thread hop.
_WRITE_BATCH = 256
_RSA_CHUNK = 16
#: The event loop runs other tasks at least this often while a batch is decoded (s).
_YIELD_S = 0.005
_DETAIL_MAX = 200


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return now_ms()


@dataclass(slots=True, kw_only=True)  # not frozen: built per message, 3x cheaper; never mutated
class Delivery:
    """An entry handed to the processor, with its shard and delivery count."""

    shard: int
    entry: Entry
    attempts: int
    #: set once the entry is queued on (to the pool, the lane or the writer): from
    #: then on it ends in ``tracker.done`` there
    handed: bool = False

    @property
    def owner(self) -> str:
        """The replay record's value for this entry: ``<shard>|<entry id>``."""
        return f"{self.shard}|{self.entry.id}"


_Authed = tuple[Delivery, wire.Request, envelopes.Opened]


class Tracker(Protocol):
    """The runtime's bookkeeping of entries in flight (slots and heartbeats)."""

    def parked(self, d: Delivery) -> None:
        """``d`` waits in the handshake lane: its processing slot is free again."""

    def done(self, d: Delivery) -> None:
        """``d`` is finished (acknowledged, or left pending to be reclaimed)."""

    def done_many(self, ds: Sequence[Delivery]) -> None:
        """Each of ``ds`` is finished (the writer's flush, in one call)."""


@dataclass(slots=True, kw_only=True)  # not frozen: built per message, 3x cheaper; never mutated
class _Job:
    """An authenticated request whose replay record is this entry's: run its handler.

    ``work`` is its decoded payload and attempt count once prepared (a job handed on
    after a timeout keeps it, for its next attempt).
    """

    delivery: Delivery
    request: wire.Request
    plaintext: bytes = field(repr=False)
    reply_key: bytes = field(repr=False)
    seen_ttl_ms: int
    work: Work | None = None
    #: The attempt to start at (a redelivery of a request that was being retried).
    first_attempt: int = 1
    #: ``time.monotonic()`` before its replay record was set.
    claimed_at: float = 0.0
    #: Its OpenTelemetry span, when tracing is on.
    span: Any = None


@dataclass(slots=True, kw_only=True)  # not frozen: built per message, 3x cheaper; never mutated
class _Pending:
    """A write for the writer, with what it finishes (for logs and metrics)."""

    delivery: Delivery
    write: Write
    request: wire.Request | None = None
    outcome: Outcome | None = None
    refusal: ProtocolError | None = None


class SessionCache:
    """Opened sessions by sid, valid only while the stored record bytes are the same."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._items: OrderedDict[str, tuple[bytes, Session]] = OrderedDict()

    def open(self, sid: str, raw: bytes, keks: MasterKeys) -> Session:
        """The session for this record (cached); DecryptError when it fails to open."""
        hit = self._items.get(sid)
        if hit is not None and hit[0] == raw:
            self._items.move_to_end(sid)
            return hit[1]
        session = open_record(sid, raw, keks)
        self._items[sid] = (raw, session)
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return session


class Stats:
    """Counters for one worker process."""

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.refused = 0
        self.redelivered_done = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        return {
            "ok": self.ok,
            "error": self.error,
            "refused": self.refused,
            "redelivered_done": self.redelivered_done,
        }


class Processor:
    """Takes batches of deliveries to their replies. Run :meth:`run` while it is used."""

    def __init__(
        self,
        *,
        store: Store,
        app: App,
        settings: Settings,
        service_keys: dict[str, ServiceKey],
        master_keys: MasterKeys,
        consumer: str,
        tracker: Tracker,
        clock: Clock = wall_clock_ms,
        retry: Retrier | None = None,
        metrics: Metrics | None = None,
        tracing: _tracing.Tracing | None = None,
    ) -> None:
        self.store = store
        self.tracing = tracing
        self.retry = retry or Retrier()
        self.metrics = metrics or Metrics()
        self.app = app
        self.settings = settings
        self.service_keys = service_keys
        self.master_keys = master_keys
        self.consumer = consumer
        self.tracker = tracker
        self.clock = clock
        self.sessions = SessionCache()
        self.stats = Stats()
        self._counters: dict[tuple[str, str], Any] = {}
        #: whether info lines are logged (a request_done line per reply is skipped,
        #: arguments and all, when they are not)
        self._info = log_enabled("info")
        #: handlers running at once (inline in a batch task, or in the pool)
        self._running = anyio.Semaphore(settings.concurrency)
        self._tick = time.perf_counter()
        self.dispatcher = Dispatcher(
            app, default_timeout_s=settings.handler_timeout_s, metrics=self.metrics
        )
        self.attempts = AttemptLog(store, self.retry)
        self.dispatcher.on_retry = self._save_attempt
        self._rsa = anyio.CapacityLimiter(os.cpu_count() or 2)
        self.keys = KeyPool(
            bits=settings.session_key_bits, size=4, threads=settings.handshake_concurrency
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the handler pool, the handshake lane and the writers until cancelled."""
        self._jobs = anyio.create_memory_object_stream[_Job](math.inf)
        self._writes: deque[_Pending] = deque()
        self._written_any = anyio.Event()
        self._handshakes = anyio.create_memory_object_stream[tuple[Delivery, wire.Request]](
            HANDSHAKE_BACKLOG
        )
        with contextlib.ExitStack() as streams:
            for stream in (*self._jobs, *self._handshakes):
                streams.enter_context(stream)
            async with anyio.create_task_group() as tg:
                self._batches = tg
                for _ in range(self.settings.concurrency):
                    tg.start_soon(self._handler_loop)
                for _ in range(self.settings.handshake_concurrency):
                    tg.start_soon(self._handshake_loop)
                for _ in range(2):  # one flush in flight while the next one gathers
                    tg.start_soon(self._write_loop)
                tg.start_soon(self.dispatcher.watchdog)
                await tg.start(self.keys.run)
                task_status.started()

    # -- intake: decode, authenticate, claim ------------------------------------------

    def submit(self, batch: Sequence[Delivery]) -> None:
        """Process ``batch`` in a task of its own: the reader goes on reading while its
        sessions are fetched, its RSA unwraps run and its replay records are set."""
        self._batches.start_soon(self._process_safely, batch)

    async def _process_safely(self, batch: Sequence[Delivery]) -> None:
        try:
            await self.process(batch)
        except Exception:
            # A bug, not bad input: keep serving; what was not handed on stays pending
            # and is reclaimed (and eventually dead-lettered by the delivery limit).
            log.exception("batch_failed", entries=len(batch))
            for d in batch:
                if not d.handed:
                    self.tracker.done(d)

    async def process(self, batch: Sequence[Delivery]) -> None:
        """Take a batch as far as its handlers (or the handshake lane); refuse the rest."""
        now = self.clock()
        ordinary: list[tuple[Delivery, wire.Request]] = []
        handshakes: list[tuple[Delivery, wire.Request]] = []
        tick = time.perf_counter()
        for d in batch:
            if time.perf_counter() - tick > _YIELD_S:
                await anyio.lowlevel.checkpoint()
                tick = time.perf_counter()
            try:
                request = self._admit(d, now)
            except ProtocolError as exc:
                self._refuse(d, exc)
                continue
            (handshakes if request.is_handshake else ordinary).append((d, request))
        if ordinary:
            await self._authenticate(ordinary)
        # Last: a full handshake lane holds this batch (back-pressure on the reader),
        # never the ordinary requests read with it.
        for d, request in handshakes:
            await self._park(d, request)

    def _admit(self, d: Delivery, now: int) -> wire.Request:
        """Decode and validate before any crypto; ProtocolError with what context there is."""
        try:
            request = _decode(d.entry.fields, self.settings.max_entry_size)
        except ProtocolError as exc:
            if d.attempts > self.settings.delivery_limit:
                raise _with_context(DeliveryLimit("delivered too many times"), exc) from None
            raise
        try:
            if d.attempts > self.settings.delivery_limit:
                raise DeliveryLimit("delivered too many times")
            # Freshness by this worker's clock: the entry id is the writer's choice.
            if abs(request.ts - now) > self.settings.replay_window_ms:
                raise Expired("ts is outside the freshness window")
        except ProtocolError as exc:
            _fill_context(exc, request)
            raise
        return request

    async def _park(self, d: Delivery, request: wire.Request) -> None:
        send = self._handshakes[0]
        try:
            send.send_nowait((d, request))
        except anyio.WouldBlock:
            await send.send((d, request))  # the lane is full: hold the slot meanwhile
        d.handed = True
        self.tracker.parked(d)

    async def _authenticate(self, batch: list[tuple[Delivery, wire.Request]]) -> None:
        sids = list(dict.fromkeys(r.sid for _, r in batch))
        raws = await self.retry(lambda: self.store.get_sessions(sids))
        sessions = {sid: self._session(sid, raw) for sid, raw in zip(sids, raws, strict=True)}
        now = self.clock()
        opened: list[tuple[Delivery, wire.Request, envelopes.Opened]] = []
        wrapped: list[tuple[Delivery, wire.Request, Session]] = []
        for d, r in batch:
            try:
                session = sessions[r.sid]
                if session is None:
                    raise SessionInvalid("no session, or its record failed to open")
                if session.expired(now):
                    raise SessionInvalid("the session has expired")
                if r.alg == ALG_RSA:
                    if len(r.encrypted_aes_key or b"") != session.wrapped_key_size:
                        raise Malformed("encryptedAesKey is not the session modulus size")
                    wrapped.append((d, r, session))
                else:
                    opened.append((d, r, _open(r, None, session.ks)))
            except ProtocolError as exc:
                _fill_context(exc, r)
                self._refuse(d, exc)
        if wrapped:
            # Chunks run in parallel threads (cryptography releases the GIL for RSA).
            async with anyio.create_task_group() as tg:
                for start in range(0, len(wrapped), _RSA_CHUNK):
                    tg.start_soon(self._unwrap, wrapped[start : start + _RSA_CHUNK], opened)
        if opened:
            await self._claim(opened)

    async def _unwrap(
        self,
        chunk: list[tuple[Delivery, wire.Request, Session]],
        opened: list[tuple[Delivery, wire.Request, envelopes.Opened]],
    ) -> None:
        results = await anyio.to_thread.run_sync(_open_rsa, chunk, limiter=self._rsa)
        for (d, r, _), result in zip(chunk, results, strict=True):
            if result is None:
                self._refuse(d, _fill_context(AuthFailed("authentication failed"), r))
            else:
                opened.append((d, r, result))

    def _session(self, sid: str, raw: bytes | None) -> Session | None:
        if raw is None:
            return None
        try:
            return self.sessions.open(sid, raw, self.master_keys)
        except DecryptError:
            # No traceback: it would carry the crypto library's text.
            log.error("session_record_invalid", alarm="tamper", session_id=sid)  # noqa: TRY400
            return None

    def _seen_ttl(self, request: wire.Request, now: int) -> int:
        # The record outlives the window (a copy stays a replay until it is stale)
        # and the handler's every attempt (the reply is added only while it lives).
        return max(
            request.ts + self.settings.replay_window_ms + _SEEN_MARGIN_MS - now,
            self.dispatcher.budget_ms(request.type) + _SEEN_MARGIN_MS,
        )

    async def _claim(self, batch: list[_Authed]) -> None:
        """Set the replay records (after authentication: a forgery cannot burn a mid)."""
        batch = self._still_fresh(batch)
        now, claimed_at = self.clock(), time.monotonic()
        claims = [
            Claim(sid=r.sid, mid=r.mid, owner=d.owner, ttl_ms=self._seen_ttl(r, now))
            for d, r, _ in batch
        ]
        prevs = await self.retry(lambda: self.store.claim(claims))
        jobs: list[_Job] = []
        resumed: list[_Job] = []
        for (d, r, o), claim, prev in zip(batch, claims, prevs, strict=True):
            try:
                if not self._claimed(d, prev):
                    continue
            except ProtocolError as exc:
                self._refuse(d, _fill_context(exc, r))
                continue
            jobs.append(
                _Job(
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
                self._refuse(d, _fill_context(Expired("ts is outside the freshness window"), r))
            else:
                fresh.append(item)
        return fresh

    def _retried(self, type_: str) -> bool:
        spec = self.app.get(type_)
        return spec is not None and spec.policy.retries > 0

    async def _save_attempt(self, work: Work) -> None:
        ttl_ms = int((work.expires_at - time.monotonic()) * 1000)
        await self.attempts.save(
            work.ctx.session_id, work.ctx.message_id, work.attempt, ttl_ms=ttl_ms
        )

    def _claimed(self, d: Delivery, prev: str | None) -> bool:
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
            self._write(_Pending(delivery=d, write=AckWrite(shard=d.shard, entry_id=d.entry.id)))
            return False
        raise Replay("the mid was already used by another entry")

    # -- handlers ----------------------------------------------------------------------

    async def _run_here(self, jobs: list[_Job]) -> None:
        """Run the batch's handlers in this task while they finish without suspending.

        Most handlers compute and return: a task and two hand-offs per message would
        cost more than they do. The first handler that really awaits something hands
        the rest of the batch to the handler pool and goes on here (a task only where
        a handler actually awaits). Every running handler holds one of the
        ``concurrency`` tokens, here as in the pool; with none free, the rest of the
        batch waits in the pool's queue.
        """
        try:
            self._running.acquire_nowait()  # one token: these handlers run one by one
        except anyio.WouldBlock:
            self._hand_on(jobs)
            return
        try:
            for i, job in enumerate(jobs):
                work = await self._prepare(job)
                if work is None:
                    continue
                run = self.dispatcher.run(work)
                try:
                    yielded = run.send(None)
                except StopIteration as done:
                    self._finish_job(job, done.value)
                    continue
                self._hand_on(jobs[i + 1 :])
                self._finish_job(job, await resume(run, yielded))
                return
        finally:
            self._running.release()

    def _hand_on(self, jobs: list[_Job]) -> None:
        send = self._jobs[0]
        for job in jobs:
            job.delivery.handed = True
            send.send_nowait(job)

    async def _handler_loop(self) -> None:
        while True:
            job = await self._next_job()
            try:
                async with self._running:
                    await self._execute(job)
            except Exception:
                # A bug, not bad input: keep serving; the entry stays pending and is
                # reclaimed (and eventually dead-lettered by the delivery limit).
                log.exception("entry_failed", entry_id=job.delivery.entry.id)
                self.tracker.done(job.delivery)

    async def _next_job(self) -> _Job:
        # Take queued jobs without a checkpoint each; yield to the loop every few ms.
        recv = self._jobs[1]
        try:
            job = recv.receive_nowait()
        except anyio.WouldBlock:
            job = await recv.receive()
            self._tick = time.perf_counter()
        else:
            if time.perf_counter() - self._tick > _YIELD_S:
                await anyio.lowlevel.checkpoint()
                self._tick = time.perf_counter()
        return job

    async def _prepare(self, job: _Job) -> Work | None:
        """The job's work (decoded payload, attempts); None when it is already answered."""
        if job.work is not None:
            return job.work
        r = job.request
        ctx = Context(
            session_id=r.sid,
            message_id=r.mid,
            type=r.type,
            ts=r.ts,
            entry_id=job.delivery.entry.id,
            attempt=1,
        )
        prepared = await self.dispatcher.prepare(ctx, r.field, job.plaintext)
        if isinstance(prepared, Outcome):
            self._finish_job(job, prepared)
            return None
        prepared.expires_at = job.claimed_at + job.seen_ttl_ms / 1000
        prepared.span = job.span
        if job.first_attempt > 1:
            prepared.attempt = start_attempt(job.first_attempt, prepared.spec.policy)
            log.info("retry_resumed", attempt=prepared.attempt, session_id=r.sid, message_id=r.mid)
        job.work = prepared
        return prepared

    async def _execute(self, job: _Job) -> None:
        work = await self._prepare(job)
        if work is not None:
            self._finish_job(job, await self.dispatcher.run(work))

    def _finish_job(self, job: _Job, outcome: Outcome) -> None:
        if job.span is not None and self.tracing is not None:
            self.tracing.end(job.span, outcome.status, outcome.code)
        self._reply(job.delivery, job.request, job.reply_key, outcome, seen_ttl_ms=job.seen_ttl_ms)

    def _reply(
        self,
        d: Delivery,
        r: wire.Request,
        reply_key: bytes,
        outcome: Outcome,
        *,
        seen_ttl_ms: int,
        session: Session | None = None,
    ) -> None:
        """Seal the reply and queue it, with its dead letter first (a crash between the
        two cannot happen: they are one atomic step)."""
        entry = envelopes.seal_reply_entry(r, reply_key, outcome.status, outcome.plaintext)
        letter = None
        if outcome.dead_letter is not None:
            letter = self._letter(d, outcome.dead_letter, request=r)
        write = ReplyWrite(
            shard=d.shard,
            entry_id=d.entry.id,
            sid=r.sid,
            mid=r.mid,
            owner=d.owner,
            entry=entry,
            seen_ttl_ms=seen_ttl_ms,
            letter=letter,
            session_record=seal_record(session, self.master_keys.active) if session else None,
            session_expires_at_ms=session.expires if session else None,
        )
        self._write(_Pending(delivery=d, write=write, request=r, outcome=outcome))

    # -- handshakes --------------------------------------------------------------------

    async def _handshake_loop(self) -> None:
        async for d, request in self._handshakes[1]:
            try:
                await self._handshake(d, request)
            except ProtocolError as exc:
                self._refuse(d, _fill_context(exc, request))
            except Exception:
                log.exception("entry_failed", entry_id=d.entry.id)
                self.tracker.done(d)

    async def _handshake(self, d: Delivery, request: wire.Request) -> None:
        service = self.service_keys.get(request.kid or "")
        if service is None:
            raise AuthFailed("unknown kid")
        if len(request.encrypted_aes_key or b"") != service.wrapped_key_size:
            raise Malformed("encryptedAesKey is not the service modulus size")
        opened = await self.keys.call(_open, request, service.private_key, None)
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
            accepted = handshake.accept(
                request, opened, max_ttl_s=self.settings.session_max_ttl_s
            )
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

    # -- refusals and writes -----------------------------------------------------------

    def _refuse(self, d: Delivery, exc: ProtocolError) -> None:
        """Queue the notice (when ids are well formed), the dead letter and the XACK."""
        notice = None
        if exc.session_id and exc.message_id and exc.field in wire.FIELDS:
            field: wire.Field = "e" if exc.field == "e" else "j"
            note = envelopes.notice(
                field=field, sid=exc.session_id, mid=exc.message_id, code=exc.notice, alg=exc.alg
            )
            notice = wire.encode_reply(note)
        write = RefusalWrite(
            shard=d.shard,
            entry_id=d.entry.id,
            letter=self._letter(d, exc.reason, exc=exc),
            sid=exc.session_id if notice else None,
            notice=notice,
        )
        self._write(_Pending(delivery=d, write=write, refusal=exc))

    def _write(self, pending: _Pending) -> None:
        pending.delivery.handed = True
        self._writes.append(pending)
        if len(self._writes) == 1:
            self._written_any.set()

    async def _write_loop(self) -> None:
        while True:
            batch = await self._take_writes()
            statuses = await self._finish(batch)
            finished: list[Delivery] = []
            replies: dict[tuple[str, str], int] = {}
            for pending, status in zip(batch, statuses, strict=True):
                try:
                    if self._written(pending, status, replies):
                        finished.append(pending.delivery)
                except Exception:
                    # Bookkeeping (a log line, a metric) must never stop the writer.
                    with contextlib.suppress(Exception):
                        log.exception("write_bookkeeping_failed")
                    finished.append(pending.delivery)
            self._count_replies(replies)
            self.tracker.done_many(finished)

    async def _take_writes(self) -> list[_Pending]:
        """Up to ``_WRITE_BATCH`` queued writes, once there is one."""
        queue = self._writes
        while not queue:
            if self._written_any.is_set():
                self._written_any = anyio.Event()
            await self._written_any.wait()
        return [queue.popleft() for _ in range(min(len(queue), _WRITE_BATCH))]

    async def _finish(self, batch: list[_Pending]) -> list[int | None]:
        """One script call for the batch; a call Redis refuses is split to find the cause."""
        try:
            statuses: list[int | None] = list(
                await self.retry(lambda: self.store.finish([p.write for p in batch]))
            )
            return statuses
        except ResponseError:
            if len(batch) > 1:
                half = len(batch) // 2
                return [*await self._finish(batch[:half]), *await self._finish(batch[half:])]
            p = batch[0]
            d = p.delivery
            log.error("write_refused", entry_id=d.entry.id, shard=d.shard)  # noqa: TRY400
            # Redis refused this item's whole step (say, a reply over its size limit):
            # dead-lettered by size, then acknowledged, so it never stays pending.
            reason = "unanswerable" if p.refusal is None else p.refusal.reason
            letter = self._letter(d, reason, request=p.request, exc=p.refusal, copy=False)
            refusal = RefusalWrite(shard=d.shard, entry_id=d.entry.id, letter=letter)
            try:
                await self.retry(lambda: self.store.finish([refusal]))
            except ResponseError:
                with contextlib.suppress(ResponseError):
                    await self.retry(lambda: self.store.ack(d.shard, d.entry.id))
            return [None]

    def _written(
        self, p: _Pending, status: int | None, replies: dict[tuple[str, str], int]
    ) -> bool:
        """Log and count a finished write; False when the entry goes on (a refusal
        queued in its place), True when it is done. ``replies`` counts the replies
        by (type, status), for :meth:`_count_replies`."""
        d, w = p.delivery, p.write
        if isinstance(w, ReplyWrite) and p.request is not None and p.outcome is not None:
            r = p.request
            if status == -1:
                self._refuse(d, _fill_context(SessionExists("a session already exists"), r))
                return False
            if status == -2:
                log.error("reply_unanswerable", session_id=r.sid, message_id=r.mid)
                letter = self._letter(d, "unanswerable", request=r)
                write = RefusalWrite(shard=d.shard, entry_id=d.entry.id, letter=letter)
                self._write(_Pending(delivery=d, write=write))
                return False
            if status == -3:
                log.error("dead_letter_refused", session_id=r.sid, message_id=r.mid)
            elif status == 0:
                log.info("reply_already_written", session_id=r.sid, message_id=r.mid)
            elif status == 1:
                self._count_reply(d, r, p.outcome, replies)
        elif isinstance(w, RefusalWrite) and p.refusal is not None:
            exc = p.refusal
            self.stats.refused += 1
            self.metrics.refused.labels(reason=exc.reason).inc()
            if exc.type == HANDSHAKE_TYPE:
                self.metrics.handshakes.labels(outcome=exc.reason).inc()
            log.warning(
                "request_refused",
                reason=exc.reason,
                notice=exc.notice,
                detail=exc.detail[:_DETAIL_MAX],
                session_id=exc.session_id,
                message_id=exc.message_id,
                entry_id=d.entry.id,
                shard=d.shard,
                write_failed=status if status not in (1, None) else None,
            )
        return True

    def _count_reply(
        self, d: Delivery, r: wire.Request, outcome: Outcome, replies: dict[tuple[str, str], int]
    ) -> None:
        known = r.is_handshake or self.app.get(r.type) is not None
        label = (r.type if known else "unknown", outcome.status)
        replies[label] = replies.get(label, 0) + 1
        if r.is_handshake:
            self.metrics.handshakes.labels(outcome=outcome.code or outcome.status).inc()
        if self._info:
            log.info(
                "request_done",
                status=outcome.status,
                code=outcome.code,
                attempts=d.attempts,
                session_id=r.sid,
                message_id=r.mid,
                type=r.type,
            )

    def _count_replies(self, replies: dict[tuple[str, str], int]) -> None:
        """Add a flush's replies to the counters (one increment per label)."""
        for label, n in replies.items():
            counter = self._counters.get(label)
            if counter is None:
                counter = self._counters[label] = self.metrics.requests.labels(*label)
            counter.inc(n)
            if label[1] == "ok":
                self.stats.ok += n
            else:
                self.stats.error += n

    def _letter(
        self,
        d: Delivery,
        reason: str,
        *,
        request: wire.Request | None = None,
        exc: ProtocolError | None = None,
        copy: bool = True,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "reason": reason,
            "stream": self.store.names.request_stream(d.shard),
            "id": d.entry.id,
        }
        sid = request.sid if request else exc.session_id if exc else None
        mid = request.mid if request else exc.message_id if exc else None
        type_ = request.type if request else exc.type if exc else None
        for name, value in (("sid", sid), ("mid", mid), ("type", type_)):
            if value:
                fields[name] = value
        fields.update(attempts=d.attempts, at=self.clock(), worker=self.consumer)
        entry_field = wire.entry_field(d.entry.fields)
        size = wire.entry_size(d.entry.fields)
        keep = copy and (exc is None or exc.keep_original)
        # A refusal never stores more than the copy limit: a flood of large
        # forgeries stays small in the dead-letter stream.
        if keep and entry_field is not None and size <= self.settings.dlq_copy_max:
            fields[entry_field] = d.entry.fields[entry_field.encode()]
        else:
            fields["size"] = size
        return fields


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


def _open(request: wire.Request, private_key: Any, ks: bytes | None) -> envelopes.Opened:
    try:
        return envelopes.open_request(request, private_key=private_key, ks=ks)
    except DecryptError:
        raise AuthFailed("authentication failed") from None


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


def _fill_context(exc: ProtocolError, request: wire.Request) -> ProtocolError:
    exc.session_id = exc.session_id or request.sid
    exc.message_id = exc.message_id or request.mid
    exc.field = exc.field or request.field
    exc.alg = exc.alg or request.alg
    exc.type = exc.type or request.type
    return exc


def _with_context(new: ProtocolError, old: ProtocolError) -> ProtocolError:
    new.session_id, new.message_id, new.field = old.session_id, old.message_id, old.field
    new.alg, new.type, new.keep_original = old.alg, old.type, old.keep_original
    return new
