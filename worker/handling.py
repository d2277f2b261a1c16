"""Handling: the batch path's handler stage, from claimed jobs to sealed replies.

::

    Job (authenticated and claimed, from worker.intake)
      -> run_here: handlers in the batch's own task (coro.send(None)) while they
         finish without suspending; the first that awaits hands the rest on
      -> job stream -> handler_loop x concurrency (Dispatcher.run)
      -> reply: envelopes.seal_reply_entry (+ dead letter) -> PendingWrite -> writer

A semaphore of ``concurrency`` tokens bounds the handlers running at once, inline
or in the pool. The handshake lane seals its replies here too (:meth:`Handling.reply`).
"""

from __future__ import annotations

import math
import time

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from worker import envelopes, wire
from worker import tracing as _tracing
from worker.attempts import AttemptLog, start_attempt
from worker.dispatch import Dispatcher, Outcome, Work, resume
from worker.handlers import Context
from worker.inflight import YIELD_S, Delivery, Job, PendingWrite, Tracker
from worker.keys import MasterKeys
from worker.logging import get_logger
from worker.sessions import Session, seal_record
from worker.settings import Settings
from worker.streams import ReplyWrite
from worker.values import builder
from worker.writer import Writer

#: how much sooner than the replay record the attempt record expires, at least (ms)
_ATTEMPT_MARGIN_MS = 1_000

log = get_logger("sealstream.worker")
_context = builder(Context)  # per message: see worker.values


class Handling:
    """Runs the handlers of claimed jobs and queues their replies. Run :meth:`open` in
    the event loop before the first job, then :meth:`handler_loop` tasks."""

    def __init__(
        self,
        *,
        settings: Settings,
        dispatcher: Dispatcher,
        attempts: AttemptLog,
        master_keys: MasterKeys,
        tracker: Tracker,
        writer: Writer,
        tracing: _tracing.Tracing | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.attempts = attempts
        #: seals a handshake's new session record (swapped on a key reload)
        self.master_keys = master_keys
        self.tracker = tracker
        self.tracing = tracing
        self._write = writer.write
        self._letter = writer.letter
        #: handlers running at once (inline in a batch task, or in the pool)
        self._running = anyio.Semaphore(settings.concurrency)
        self._tick = time.perf_counter()

    def open(self) -> tuple[MemoryObjectSendStream[Job], MemoryObjectReceiveStream[Job]]:
        """The handler pool's job stream (unbounded: slots bound it), for the caller
        to close."""
        self._jobs = anyio.create_memory_object_stream[Job](math.inf)
        return self._jobs

    async def save_attempt(self, work: Work) -> None:
        """Record the attempt number of a request about to be retried.

        It must not outlive the replay record: ``expires_at`` is taken before that
        record's claim reached Redis, but this write may take longer to get there, so
        a second is kept in hand (the replay record outlives the handler's whole
        budget by a minute).
        """
        ttl_ms = int((work.expires_at - time.monotonic()) * 1000) - _ATTEMPT_MARGIN_MS
        await self.attempts.save(
            work.ctx.session_id, work.ctx.message_id, work.attempt, ttl_ms=ttl_ms
        )

    async def run_here(self, jobs: list[Job]) -> None:
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
            self.tracker.handlers_busy()
            self._hand_on(jobs)
            return
        try:
            for i, job in enumerate(jobs):
                if time.perf_counter() - self._tick > YIELD_S:
                    # A long batch of handlers that never await: let the loop run
                    # (heartbeats, writers, other batches) every few ms.
                    await anyio.lowlevel.checkpoint()
                    self._tick = time.perf_counter()
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
            self.tracker.handlers_idle()
        finally:
            self._running.release()

    def _hand_on(self, jobs: list[Job]) -> None:
        send = self._jobs[0]
        for job in jobs:
            job.delivery.handed = True
            send.send_nowait(job)

    async def handler_loop(self) -> None:
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

    async def _next_job(self) -> Job:
        # Take queued jobs without a checkpoint each; yield to the loop every few ms.
        recv = self._jobs[1]
        try:
            job = recv.receive_nowait()
        except anyio.WouldBlock:
            self.tracker.handlers_idle()
            job = await recv.receive()
            self._tick = time.perf_counter()
        else:
            self.tracker.handlers_busy()
            if time.perf_counter() - self._tick > YIELD_S:
                await anyio.lowlevel.checkpoint()
                self._tick = time.perf_counter()
        return job

    async def _prepare(self, job: Job) -> Work | None:
        """The job's work (decoded payload, attempts); None when it is already answered."""
        if job.work is not None:
            return job.work
        r = job.request
        ctx = _context(
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

    async def _execute(self, job: Job) -> None:
        work = await self._prepare(job)
        if work is not None:
            self._finish_job(job, await self.dispatcher.run(work))

    def _finish_job(self, job: Job, outcome: Outcome) -> None:
        if job.span is not None and self.tracing is not None:
            self.tracing.end(job.span, outcome.status, outcome.code)
        self.reply(job.delivery, job.request, job.reply_key, outcome, seen_ttl_ms=job.seen_ttl_ms)

    def reply(
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
        self._write(PendingWrite(delivery=d, write=write, request=r, outcome=outcome))
