"""The writer: the last stage of the batch path.

::

    PendingWrite (reply, refusal or bare ack; queued by every other stage)
      -> write queue (a deque) -> write_loop x 2: FINISH script, up to 256 a call
      -> per flush: logs, metrics, counters -> Tracker.done_many

Per reply the FINISH script writes the dead letter first, then, only while the
replay record is still this entry's, the reply, the record ``…|done`` and the XACK.
Refusals (:meth:`Writer.refuse`) go the same way: notice (when ``sid`` and ``mid``
are well formed), dead letter (:meth:`Writer.letter`), XACK. A script call Redis
refuses is split to find the entry, which is dead-lettered by size and acked.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import anyio
from redis.exceptions import ResponseError

from worker import envelopes, wire
from worker.dispatch import Outcome
from worker.errors import ProtocolError, SessionExists
from worker.handlers import App
from worker.inflight import Clock, Delivery, PendingWrite, Stats, Tracker, fill_context
from worker.logging import enabled as log_enabled
from worker.logging import get_logger
from worker.metrics import Metrics
from worker.protocol import HANDSHAKE_TYPE
from worker.settings import Settings
from worker.streams import RefusalWrite, ReplyWrite, Retrier, Store

log = get_logger("sealstream.worker")
#: Messages per writer script call.
_WRITE_BATCH = 256
_DETAIL_MAX = 200


class Writer:
    """Queues the batch path's writes and flushes them. Run :meth:`open` in the event
    loop before the first write, then :meth:`write_loop` tasks."""

    def __init__(
        self,
        *,
        store: Store,
        app: App,
        settings: Settings,
        consumer: str,
        tracker: Tracker,
        clock: Clock,
        retry: Retrier,
        metrics: Metrics,
        stats: Stats,
    ) -> None:
        self.store = store
        self.retry = retry
        self.metrics = metrics
        self.app = app
        self.settings = settings
        self.consumer = consumer
        self.tracker = tracker
        self.clock = clock
        self.stats = stats
        self._counters: dict[tuple[str, str], Any] = {}
        #: whether info lines are logged (a request_done line per reply is skipped,
        #: arguments and all, when they are not)
        self._info = log_enabled("info")

    def open(self) -> None:
        """An empty write queue, and its wake-up event (of the running event loop)."""
        self._writes: deque[PendingWrite] = deque()
        self._written_any = anyio.Event()

    def refuse(self, d: Delivery, exc: ProtocolError) -> None:
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
            letter=self.letter(d, exc.reason, exc=exc),
            sid=exc.session_id if notice else None,
            notice=notice,
        )
        self.write(PendingWrite(delivery=d, write=write, refusal=exc))

    def write(self, pending: PendingWrite) -> None:
        """Queue ``pending``: from now on its entry ends in the writer."""
        pending.delivery.handed = True
        self._writes.append(pending)
        if len(self._writes) == 1:
            self._written_any.set()

    async def write_loop(self) -> None:
        """Flush queued writes, one script call per flush, until cancelled."""
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
            try:
                self._count_replies(replies)
            except Exception:
                with contextlib.suppress(Exception):
                    log.exception("write_bookkeeping_failed")
            # The entries are done whatever the bookkeeping did.
            self.tracker.done_many(finished)

    async def _take_writes(self) -> list[PendingWrite]:
        """Up to ``_WRITE_BATCH`` queued writes, once there is one."""
        queue = self._writes
        while not queue:
            if self._written_any.is_set():
                self._written_any = anyio.Event()
            await self._written_any.wait()
        batch = [queue.popleft() for _ in range(min(len(queue), _WRITE_BATCH))]
        self.tracker.writing([p.delivery for p in batch])
        return batch

    async def _finish(self, batch: list[PendingWrite]) -> list[int | None]:
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
            letter = self.letter(d, reason, request=p.request, exc=p.refusal, copy=False)
            refusal = RefusalWrite(shard=d.shard, entry_id=d.entry.id, letter=letter)
            try:
                await self.retry(lambda: self.store.finish([refusal]))
            except ResponseError:
                with contextlib.suppress(ResponseError):
                    await self.retry(lambda: self.store.ack(d.shard, d.entry.id))
            return [None]

    def _written(
        self, p: PendingWrite, status: int | None, replies: dict[tuple[str, str], int]
    ) -> bool:
        """Log and count a finished write; False when the entry goes on (a refusal
        queued in its place), True when it is done. ``replies`` counts the replies
        by (type, status), for :meth:`_count_replies`."""
        d, w = p.delivery, p.write
        if isinstance(w, ReplyWrite) and p.request is not None and p.outcome is not None:
            r = p.request
            if status == -1:
                self.refuse(d, fill_context(SessionExists("a session already exists"), r))
                return False
            if status == -2:
                log.error("reply_unanswerable", session_id=r.sid, message_id=r.mid)
                letter = self.letter(d, "unanswerable", request=r)
                write = RefusalWrite(shard=d.shard, entry_id=d.entry.id, letter=letter)
                self.write(PendingWrite(delivery=d, write=write))
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

    def letter(
        self,
        d: Delivery,
        reason: str,
        *,
        request: wire.Request | None = None,
        exc: ProtocolError | None = None,
        copy: bool = True,
    ) -> dict[str, Any]:
        """The dead letter of ``d``: its ids, and a copy of the entry when small enough."""
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
