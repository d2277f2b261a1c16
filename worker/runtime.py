"""The worker runtime: an anyio task group that owns every task.

- a reader per shard (XREADGROUP ``>``), and a second one while the shard has a
  backlog (:data:`READERS_PER_SHARD`), each reading a batch of at most its share of
  the free slots (handlers running plus the read-ahead, :mod:`worker.readahead`)
  and handing it to the :class:`~worker.processor.Processor`;
- a reclaimer (XAUTOCLAIM past the claim timeout, from any consumer), which also
  enforces the delivery limit;
- a heartbeat that keeps this worker's in-flight entries from looking idle, so a
  long handler is not run twice;
- a trimmer (XTRIM MINID behind the group) every ``trim_interval_s``, and a shard
  this worker read many entries from within a second (:data:`_TRIM_AFTER_READ`);
- :meth:`Worker.stop` (SIGTERM/SIGINT in the CLI): stop reading, let in-flight
  handlers finish within ``grace_s``, write their replies and acks, return.

Every Redis call goes through ``Worker._retrier``, which rides out an outage
with capped, jittered backoff and logs once per outage.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from redis.exceptions import ResponseError

from worker import lifespan, tracing
from worker.cluster import open_redis, store_for
from worker.errors import ConfigError
from worker.handlers import App
from worker.health import Readiness
from worker.inflight import Clock, Delivery, wall_clock_ms
from worker.keys import MasterKeys, ServiceKey
from worker.keyspace import Names
from worker.logging import get_logger
from worker.metrics import Metrics
from worker.metrics import serve as serve_metrics
from worker.processor import Processor
from worker.readahead import ReadAhead
from worker.settings import Settings, redacted_url
from worker.slots import Slots
from worker.streams import AnyRedis, Entry, Retrier, Store

log = get_logger("sealstream.worker")
_READ_BLOCK_MS = 500
#: Entries one XREADGROUP or XAUTOCLAIM asks for at most.
_MAX_READ = 256
#: Readers of a shard while it has a backlog (its last read came back full), each
#: with its share of the slots: while one read's batch is decoded and claimed, the
#: next read is already on its way. With one, a 4 KiB drain kept the worker only
#: ~82% busy, waiting on its read and CLAIM round trips; with two, ~93% (three: no
#: more). A quiet shard has one read at a time (the others wait for a backlog): a
#: second would halve its batches and double their round trips.
READERS_PER_SHARD = 2


class _Backlog:
    """Whether a shard's last read came back full: its helper readers read only then."""

    def __init__(self) -> None:
        self.full = False
        self._raised = anyio.Event()

    def mark(self, full: bool) -> None:
        """A read of the shard came back full (``True``) or not."""
        if full and not self.full:
            self._raised.set()
        elif not full and self.full:
            self._raised = anyio.Event()
        self.full = full

    async def wait(self) -> None:
        """Until the shard has a backlog, or :meth:`wake` (the caller checks again)."""
        if not self.full:
            await self._raised.wait()

    def wake(self) -> None:
        """Wake the waiting helpers (the worker is stopping)."""
        self._raised.set()


#: A reader that found no slot free waits, once one is, up to _REFILL_PATIENCE_S for
#: this part of its share (1/4) to be. RSA 1 KiB drain, three alternating rounds:
#: 3,610-3,974 req/s with 50 ms, 3,577-3,701 with 10 ms, 3,386-3,409 without (reads of
#: ~39 entries become ~150); session-key drains unchanged (their slots are rarely all
#: taken). A bound, not a wait for the refill alone: slots held by other shards'
#: readers or above a lowered limit may never let it come free (a review found that
#: reader starving).
_REFILL_PART = 4
_REFILL_PATIENCE_S = 0.05
#: A shard this worker has read this many entries from since its last trim is trimmed
#: within _TRIM_CHECK_S rather than at the next pass: Redis frees trimmed entries while
#: every other command waits, and a pass every 10 s at 7,000 requests/s of 4 KiB froze
#: it for 36-50 ms (SK 4 KiB latency test: producer 31-95 ms behind its schedule
#: against 9 ms with trims a second apart).
_TRIM_AFTER_READ = 1_000
_TRIM_CHECK_S = 1.0
#: SET NX GET, XINFO GROUPS lag (7.0), XAUTOCLAIM (6.2).
MIN_REDIS = (7, 0)


class Worker:
    """A worker process's runtime. Run it with ``await worker.run()`` in a task group."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        *,
        service_key: ServiceKey,
        master_keys: MasterKeys,
        older_service_keys: tuple[ServiceKey, ...] = (),
        clock: Clock = wall_clock_ms,
        consumer: str | None = None,
        metrics: Metrics | None = None,
        tracer_provider: Any = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.service_key = service_key
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self._keys = {k.kid: k for k in (*older_service_keys, service_key)}
        self._master_keys = master_keys
        self._clock = clock
        self._stopping = anyio.Event()
        self._slots = Slots(settings.in_flight_limit)
        #: Shards read now: settings.shards, or more once P:config says so.
        self.shards = settings.shards
        self._in_flight: dict[int, set[str]] = {s: set() for s in range(settings.shards)}
        #: per shard, whether its last read came back full (its helper readers' cue)
        self._backlogs: dict[int, _Backlog] = {}
        #: entries read per shard since its last trim (the trimmer's cue)
        self._read_since_trim: Counter[int] = Counter()
        self._feeders: TaskGroup | None = None
        #: in flight with their slot given back (parked handshakes, entries in a write)
        self._released: set[tuple[int, str]] = set()
        self._idle = anyio.Event()
        self.metrics = metrics or Metrics()
        self._read_ahead = ReadAhead(
            self._slots,
            concurrency=settings.concurrency,
            start=settings.in_flight_limit - settings.concurrency,
            adaptive=settings.prefetch is None,
            on_change=self.metrics.read_ahead.set,
        )
        self.metrics.read_ahead.set(self._read_ahead.depth)
        self._retrier = Retrier(on_outage=self.metrics.redis_outages.inc)
        self.processor: Processor | None = None
        # Checked now: SEALSTREAM_OTEL=1 without OpenTelemetry installed is a ConfigError.
        self._tracing = tracing.create(settings.otel, tracer_provider)
        self._store: Store | None = None
        self._startup: anyio.CancelScope | None = None
        # Health hook (worker/health.py): the read loop reports each completed read.
        self.health = Readiness(on_read=self.metrics.last_read.set_to_current_time)

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop reading and finish what it has (idempotent)."""
        self._stopping.set()
        if self.processor is not None:
            self.processor.keys.stop_filling()
        for backlog in self._backlogs.values():
            backlog.wake()
        if self._startup is not None:
            self._startup.cancel()

    def ready(self) -> bool:
        """For ``/readyz``: not stopping, and a shard read completed recently."""
        return not self._stopping.is_set() and self.health.ready()

    async def reload_keys(
        self,
        service_key: ServiceKey,
        master_keys: MasterKeys,
        *,
        older_service_keys: tuple[ServiceKey, ...] = (),
    ) -> None:
        """Swap in new keys without dropping work (SIGHUP in the CLI).

        Handshakes pinned to any of the service keys are accepted from now on;
        ``service_key`` is published in ``P:config`` for new clients. Session records
        are sealed under the new active master key and open under any in the ring.
        Work in flight goes on: the key maps are replaced in place, between messages.
        """
        keys = {k.kid: k for k in (*older_service_keys, service_key)}
        self._keys.clear()
        self._keys.update(keys)  # the processor's handshake lane holds this dict
        self.service_key = service_key
        self._master_keys = master_keys
        if self.processor is not None:
            self.processor.master_keys = master_keys
        log.info(
            "keys_reloaded",
            kid=service_key.kid,
            kids=sorted(keys),
            master_key_ids=list(master_keys.ids),
        )
        if self._store is not None:
            await self._publish_config(self._store)

    @property
    def stats(self) -> dict[str, int]:
        """Counters of what this worker has done."""
        return self.processor.stats.snapshot() if self.processor else {}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop` (or, with ``burst``, until the shards are drained)."""
        s = self.settings
        exporter = None
        if s.metrics_port is not None:
            exporter = serve_metrics(
                self.metrics, port=s.metrics_port, addr=s.metrics_addr, ready=self.ready
            )
            log.info("metrics_serving", addr=s.metrics_addr, port=exporter.port)
        client: AnyRedis | None = None
        try:
            log.info("worker_connecting", redis=redacted_url(s.redis_url))
            # Startup waits out an unreachable Redis, but a stop request ends the wait.
            with anyio.CancelScope() as startup:
                self._startup = startup
                if self._stopping.is_set():
                    startup.cancel()
                # A cluster or a single server: the node says which (SEALSTREAM_CLUSTER).
                client = await self._retrier(
                    partial(
                        open_redis,
                        s.redis_url,
                        name=f"sealstream-worker:{self.consumer}",
                        cluster=s.cluster,
                    )
                )
                store = store_for(
                    client,
                    Names(s.prefix),
                    reply_maxlen=s.reply_maxlen,
                    dlq_maxlen=s.dlq_maxlen,
                    fallback_ttl_ms=2 * s.replay_window_ms,
                )
                self.processor = Processor(
                    store=store,
                    app=self.app,
                    settings=s,
                    service_keys=self._keys,
                    master_keys=self._master_keys,
                    consumer=self.consumer,
                    tracker=self,
                    clock=self._clock,
                    retry=self._retrier,
                    metrics=self.metrics,
                    tracing=self._tracing,
                )
                self._store = store
                await self._start_up(store)
            self._startup = None
            if startup.cancel_called:
                log.info("worker_stopped_before_start")
                return
            await lifespan.start(self.app)
            try:
                await self._serve(store, task_status=task_status)
            finally:
                await lifespan.stop(self.app, timeout_s=s.grace_s)
            log.info("worker_stopped", **self.stats)
        finally:
            if client is not None:
                with anyio.move_on_after(2, shield=True):
                    await client.aclose()
            if exporter is not None:
                exporter.close()

    async def _serve(self, store: Store, *, task_status: TaskStatus[None]) -> None:
        """Read and process until stopped, then drain within the grace period."""
        s = self.settings
        assert self.processor is not None
        log.info(
            "worker_started",
            consumer=self.consumer,
            shards=self.shards,
            concurrency=s.concurrency,
            kid=self.service_key.kid,
            handlers=self.app.names,
        )
        async with anyio.create_task_group() as outer:
            # The handlers, writers and the heartbeat outlive the feeders: in-flight
            # entries still need them during the grace period.
            await outer.start(self.processor.run)
            outer.start_soon(
                partial(self._supervised, after_stop=True),
                store,
                partial(self._heartbeat_loop, store),
            )
            async with anyio.create_task_group() as feeders:
                self._feeders = feeders
                loops = [
                    partial(self._read_loop, store, n, helper=i > 0)
                    for n in range(self.shards)
                    for i in range(READERS_PER_SHARD)
                ]
                loops += [partial(self._reclaim_loop, store), partial(self._trim_loop, store)]
                if s.burst:
                    loops.append(partial(self._burst_watch, store))
                for loop in loops:
                    feeders.start_soon(self._supervised, store, loop)
                task_status.started()
                await self._stopping.wait()
                # Every feeder returns on its own once it sees the flag (a reader
                # within one blocking read), so no read is cut off after Redis
                # delivered to us; the deadline is a safety net.
                feeders.cancel_scope.deadline = anyio.current_time() + 2.0
            log.info("worker_stopping", in_flight=self._count_in_flight())
            with anyio.move_on_after(s.grace_s) as grace:
                while self._count_in_flight():
                    self._idle = anyio.Event()
                    await self._idle.wait()
            outer.cancel_scope.cancel()
        if grace.cancel_called:
            log.warning("worker_grace_expired", left=self._count_in_flight())

    async def _start_up(self, store: Store) -> None:
        """Check the server, create the groups, publish ``P:config``."""
        version = await self._retrier(store.server_version)
        if version < MIN_REDIS:
            raise ConfigError(
                f"SEALSTREAM_REDIS_URL: Redis {'.'.join(map(str, version))} is too old;"
                f" sealstream needs {'.'.join(map(str, MIN_REDIS))} or newer"
            )
        # Never fewer shards than P:config has (`sealstream shards set` grew them).
        self._grow(await self._retrier(store.read_config))
        await self._retrier(lambda: store.ensure_groups(self.shards))
        await self._publish_config(store)

    def _grow(self, config: dict[str, str]) -> bool:
        """Take ``P:config`` ``shards`` when it is more than this worker reads."""
        raw = config.get("shards", "")
        wanted = int(raw) if raw.isdigit() and 0 < len(raw) <= 4 else 0
        if not self.shards < wanted <= 1024:
            return False
        for shard in range(self.shards, wanted):
            self._in_flight.setdefault(shard, set())
        self.shards = wanted
        return True

    async def _publish_config(self, store: Store) -> None:
        await self._retrier(
            lambda: store.publish_config(
                shards=self.shards,
                public_pem=self.service_key.public_pem,
                kid=self.service_key.kid,
            )
        )

    # -- loops -----------------------------------------------------------------------

    async def _supervised(
        self, store: Store, loop: Callable[[], Awaitable[None]], *, after_stop: bool = False
    ) -> None:
        """Run a loop; an unexpected error is logged and the loop restarts after a backoff.

        Outages are ridden out inside the loops; this is for the rest (a request
        stream deleted under us: its group is re-created), so no single failure
        stops the worker. ``after_stop`` loops (the heartbeat) keep restarting while
        in-flight work finishes.
        """
        delay = 0.1
        while True:
            try:
                await loop()
                return
            except Exception as exc:
                name = getattr(getattr(loop, "func", loop), "__name__", "loop")
                log.exception("loop_failed", loop=name)
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    await self._retrier(partial(store.ensure_groups, self.shards))
                    log.warning("group_recreated")
            with anyio.move_on_after(delay):
                await self._stopping.wait()
            if self._stopping.is_set() and not after_stop:
                return
            delay = min(delay * 2, 5.0)

    async def _read_loop(self, store: Store, shard: int, *, helper: bool = False) -> None:
        """Read ``shard`` until the worker stops. A ``helper`` reads only while the
        shard has a backlog (see :data:`READERS_PER_SHARD`)."""
        backlog = self._backlogs.setdefault(shard, _Backlog())
        busy = False  # whether the last read filled what it asked for
        while not self._stopping.is_set():
            if helper:
                if not backlog.full:
                    await backlog.wait()
                    continue
                busy = True
            # A reader blocked on a quiet shard must not hold every free slot: it
            # asks for its share of the starting limit; only a reader of a shard
            # with a backlog asks for its share of a deeper one (split with the
            # helpers), and only its waiting for a slot counts as the read-ahead
            # holding the pace.
            if busy:
                share = max(1, self._slots.limit // self.shards)
                if self._split():
                    share //= READERS_PER_SHARD
            else:
                share = max(1, self.settings.in_flight_limit // self.shards)
            if busy and not self._slots.free:
                self._read_ahead.starved()
            # With no slot free, wait a little for a quarter of the share rather than
            # read the first one given back (see worker.slots).
            slots = await self._take_slots(share, refill=share // _REFILL_PART)
            if self._stopping.is_set():
                # Stopped while waiting for slots: no read the grace period could cut off.
                self._give_back(slots)
                return
            try:
                entries = await self._retrier(
                    partial(store.read, shard, self.consumer, count=slots, block_ms=_READ_BLOCK_MS)
                )
            except BaseException:
                self._give_back(slots)
                raise
            self.health.read_completed()
            self._give_back(slots - len(entries))
            busy = slots > 1 and len(entries) >= slots  # one asked for proves nothing
            backlog.mark(busy and self._split())
            if entries:
                self._read_ahead.read(len(entries), sum(map(_entry_size, entries)))
                await self._process(shard, entries, {})

    def _split(self) -> bool:
        """Whether a shard with a backlog has room for its helpers: a share of at least
        two slots each (a read of one proves nothing, so split further every read
        would be of one)."""
        return self._slots.limit // (self.shards * READERS_PER_SHARD) >= 2

    async def _reclaim_loop(self, store: Store) -> None:
        s = self.settings
        interval = max(0.05, min(s.claim_idle_ms / 4000, 5.0))
        while not self._stopping.is_set():
            for shard in range(self.shards):
                start = "0-0"
                while not self._stopping.is_set():
                    slots = await self._take_slots()
                    try:
                        start, entries = await self._retrier(
                            partial(
                                store.autoclaim,
                                shard,
                                self.consumer,
                                min_idle_ms=s.claim_idle_ms,
                                start=start,
                                count=slots,
                            )
                        )
                        entries = [e for e in entries if e.id not in self._in_flight[shard]]
                        counts = await self._retrier(
                            partial(store.delivery_counts, shard, [e.id for e in entries])
                        )
                    except BaseException:
                        self._give_back(slots)
                        raise
                    self._give_back(slots - len(entries))
                    for entry in entries:
                        log.info(
                            "entry_reclaimed", entry_id=entry.id, attempts=counts.get(entry.id)
                        )
                        self.metrics.reclaimed.inc()
                    if entries:
                        await self._process(shard, entries, counts)
                    if start == "0-0":
                        break
            with anyio.move_on_after(interval):
                await self._stopping.wait()

    async def _heartbeat_loop(self, store: Store) -> None:
        interval = max(0.05, self.settings.claim_idle_ms / 3000)
        while True:
            await anyio.sleep(interval)
            # A copy: shards may be added (by the trimmer) while this loop awaits.
            for shard, ids in list(self._in_flight.items()):
                if ids:
                    await self._retrier(partial(store.touch, shard, self.consumer, list(ids)))

    async def _trim_loop(self, store: Store) -> None:
        next_pass = anyio.current_time()
        while not self._stopping.is_set():
            if anyio.current_time() >= next_pass:
                # Passes start every interval (the protocol's "at least every 10 s").
                next_pass = anyio.current_time() + self.settings.trim_interval_s
                config = await self._retrier(store.read_config)
                if not config:
                    # Redis lost it (restarted empty, or flushed): clients need it.
                    await self._publish_config(store)
                    log.warning("config_republished")
                else:
                    await self._add_shards(store, config)
                for shard in range(self.shards):
                    await self._trim(store, shard)
                    await self._retrier(
                        partial(store.delete_idle_consumers, shard, idle_ms=3_600_000)
                    )
            else:
                for shard, read in list(self._read_since_trim.items()):
                    if read >= _TRIM_AFTER_READ:
                        await self._trim(store, shard)
            wake = min(next_pass, anyio.current_time() + _TRIM_CHECK_S)
            with anyio.move_on_after(wake - anyio.current_time()):
                await self._stopping.wait()

    async def _trim(self, store: Store, shard: int) -> None:
        self._read_since_trim[shard] = 0
        trimmed = await self._retrier(partial(store.trim, shard))
        if trimmed:
            log.debug("shard_trimmed", shard=shard, entries=trimmed)

    async def _add_shards(self, store: Store, config: dict[str, str]) -> None:
        """Start readers for shards ``P:config`` gained (``sealstream shards set``)."""
        before = self.shards
        if self._feeders is None or not self._grow(config):
            return
        await self._retrier(lambda: store.ensure_groups(self.shards))
        for shard in range(before, self.shards):
            for i in range(READERS_PER_SHARD):
                reader = partial(self._read_loop, store, shard, helper=i > 0)
                self._feeders.start_soon(self._supervised, store, reader)
        log.info("shards_added", before=before, shards=self.shards)

    async def _burst_watch(self, store: Store) -> None:
        """In burst mode, stop once nothing is pending, in flight or unread."""
        quiet = 0
        while not self._stopping.is_set():
            await anyio.sleep(0.2)
            if self._count_in_flight():
                quiet = 0
                continue
            drained = True
            for shard in range(self.shards):
                pending = await self._retrier(partial(store.pending, shard))
                lag = await self._retrier(partial(store.lag, shard))
                drained = drained and pending.count == 0 and lag == 0
            quiet = quiet + 1 if drained else 0
            if quiet >= 2:
                log.info("burst_drained")
                self.stop()

    # -- helpers ---------------------------------------------------------------------

    async def _process(self, shard: int, entries: list[Entry], counts: dict[str, int]) -> None:
        assert self.processor is not None
        batch = [Delivery(shard=shard, entry=e, attempts=counts.get(e.id, 1)) for e in entries]
        for d in batch:
            self._in_flight[shard].add(d.entry.id)
        self._read_since_trim[shard] += len(batch)
        self.metrics.in_flight.inc(len(batch))
        self.processor.submit(batch)

    # -- Tracker: the processor reports here ------------------------------------------

    def parked(self, d: Delivery) -> None:
        """``d`` waits in the handshake lane: free its slot (it stays in flight)."""
        self._release((d,))

    def handlers_idle(self) -> None:
        self._read_ahead.handlers_idle()

    def handlers_busy(self) -> None:
        self._read_ahead.handlers_busy()

    def writing(self, ds: Sequence[Delivery]) -> None:
        """``ds`` are in a writer's script call: free their slots (they stay in flight).

        The slots bound what waits before and in the handlers; at most two script
        calls of ``_WRITE_BATCH`` entries are past them.
        """
        self._release(ds)

    def _release(self, ds: Sequence[Delivery]) -> None:
        """Give back the slots of ``ds`` still in flight, once each (``done`` then gives
        none back for them)."""
        freed = 0
        released = self._released
        for d in ds:
            key = (d.shard, d.entry.id)
            if key not in released and d.entry.id in self._in_flight[d.shard]:
                released.add(key)
                freed += 1
        self._slots.give(freed)

    def done(self, d: Delivery) -> None:
        """``d`` is finished: no longer in flight; its slot is free (idempotent)."""
        ids = self._in_flight[d.shard]
        if d.entry.id not in ids:
            return
        ids.discard(d.entry.id)
        self.metrics.in_flight.dec()
        key = (d.shard, d.entry.id)
        if key in self._released:
            self._released.discard(key)
        else:
            self._slots.give()
        if not self._count_in_flight():
            self._idle.set()

    def done_many(self, ds: Sequence[Delivery]) -> None:
        """Each of ``ds`` is finished (:meth:`done`, with one metric update)."""
        finished = freed = 0
        for d in ds:
            ids = self._in_flight[d.shard]
            if d.entry.id not in ids:
                continue
            ids.discard(d.entry.id)
            finished += 1
            key = (d.shard, d.entry.id)
            if key in self._released:
                self._released.discard(key)
            else:
                freed += 1
        self._slots.give(freed)
        if finished:
            if not self._count_in_flight():
                self._idle.set()
            self.metrics.in_flight.dec(finished)  # last: nothing above may be skipped

    async def _take_slots(self, most: int = _MAX_READ, *, refill: int = 1) -> int:
        """Take up to ``most`` free processing slots (with none free, wait for one, then
        a little for ``refill``)."""
        return await self._slots.take(
            min(most, _MAX_READ), refill=refill, patience_s=_REFILL_PATIENCE_S
        )

    def _give_back(self, n: int) -> None:
        self._slots.give(n)

    def in_flight(self) -> int:
        """Entries read and not finished yet (the key pool fills only at none)."""
        return self._count_in_flight()

    def _count_in_flight(self) -> int:
        return sum(len(ids) for ids in self._in_flight.values())


def _entry_size(entry: Entry) -> int:
    return sum(map(len, entry.fields.values()))
