"""The worker's data path, a batch of stream entries at a time: the stages, wired.

::

    entries -> intake: wire.decode_request -> freshness -> sessions (one MGET per
      batch) -> envelopes.open_request (SK on the loop; RSA in chunks: unwrap
      processes, worker.unwrapping, or threads)
      -> replay records (one script per batch)
      -> handling: handlers inline, then the handler pool -> envelopes.seal_reply
      -> writer: reply + record done + XACK (one script per flush of many messages)

Each stage is a module of its own: :mod:`worker.intake`, :mod:`worker.handling`,
:mod:`worker.writer`, and :mod:`worker.handshake_lane`, where handshakes go after
decoding, so a flood of them never takes the slots or threads of ordinary requests
(bounded key generation, :mod:`worker.keypool`). What travels between them is in
:mod:`worker.inflight`. Every refusal sends a notice (when ``sid`` and ``mid`` are
well formed), writes a dead letter, then acknowledges. Nothing here raises for bad
input; Redis outages are waited out by the retrier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import anyio
from anyio.abc import TaskStatus

from worker import tracing as _tracing
from worker.attempts import AttemptLog
from worker.dispatch import Dispatcher
from worker.handlers import App
from worker.handling import Handling
from worker.handshake_lane import HandshakeLane
from worker.inflight import Clock, Delivery, Stats, Tracker, wall_clock_ms
from worker.intake import Intake
from worker.keypool import KeyPool
from worker.keys import MasterKeys, ServiceKey
from worker.logging import get_logger
from worker.metrics import Metrics
from worker.settings import Settings
from worker.streams import Retrier, Store
from worker.unwrapping import UnwrapPool
from worker.writer import Writer

log = get_logger("sealstream.worker")


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
        self.consumer = consumer
        self.tracker = tracker
        self.clock = clock
        self.stats = Stats()
        self.dispatcher = Dispatcher(
            app, default_timeout_s=settings.handler_timeout_s, metrics=self.metrics
        )
        self.attempts = AttemptLog(store, self.retry)
        #: batches taken in (the key pool fills up while it stays the same)
        self.batches = 0
        self.keys = KeyPool(
            bits=settings.session_key_bits,
            size=settings.handshake_pool,
            threads=settings.handshake_concurrency,
            priority=settings.handshake_priority,
            activity=lambda: self.batches,
            busy=lambda: tracker.in_flight() > 0,
            ready_gauge=self.metrics.handshake_keys_ready,
        )
        #: RSA unwraps in child processes (started when the first RSA request comes)
        self.unwraps = UnwrapPool(
            settings.unwrap_processes_or_cpus, gauge=self.metrics.unwrap_processes
        )
        # The stages, last first: each holds the ones it hands on to.
        self.writer = Writer(
            store=store,
            app=app,
            settings=settings,
            consumer=consumer,
            tracker=tracker,
            clock=clock,
            retry=self.retry,
            metrics=self.metrics,
            stats=self.stats,
        )
        self.handling = Handling(
            settings=settings,
            dispatcher=self.dispatcher,
            attempts=self.attempts,
            master_keys=master_keys,
            tracker=tracker,
            writer=self.writer,
            tracing=tracing,
        )
        self.dispatcher.on_retry = self.handling.save_attempt
        self.intake = Intake(
            store=store,
            app=app,
            settings=settings,
            master_keys=master_keys,
            clock=clock,
            retry=self.retry,
            metrics=self.metrics,
            stats=self.stats,
            dispatcher=self.dispatcher,
            attempts=self.attempts,
            handling=self.handling,
            writer=self.writer,
            unwraps=self.unwraps,
            tracing=tracing,
        )
        self.lane = HandshakeLane(
            store=store,
            settings=settings,
            service_keys=service_keys,
            keys=self.keys,
            tracker=tracker,
            clock=clock,
            retry=self.retry,
            intake=self.intake,
            handling=self.handling,
            writer=self.writer,
        )
        self._master_keys = master_keys

    @property
    def master_keys(self) -> MasterKeys:
        """The master keys session records open under and are sealed with."""
        return self._master_keys

    @master_keys.setter
    def master_keys(self, master_keys: MasterKeys) -> None:
        # A key reload: intake opens records with them, handling seals new ones.
        self._master_keys = self.intake.master_keys = self.handling.master_keys = master_keys

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the handler pool, the handshake lane and the writers until cancelled."""
        self.writer.open()
        with contextlib.ExitStack() as streams:
            for stream in (*self.handling.open(), *self.lane.open()):
                streams.enter_context(stream)
            async with anyio.create_task_group() as tg:
                self._batches = tg
                for _ in range(self.settings.concurrency):
                    tg.start_soon(self.handling.handler_loop)
                for _ in range(self.settings.handshake_concurrency):
                    tg.start_soon(self.lane.handshake_loop)
                for _ in range(2):  # one flush in flight while the next one gathers
                    tg.start_soon(self.writer.write_loop)
                tg.start_soon(self.dispatcher.watchdog)
                await tg.start(self.keys.run)
                await tg.start(self.unwraps.run)
                task_status.started()

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
        self.batches += 1
        handshakes = await self.intake.process(batch)
        # Last: a full handshake lane holds this batch (back-pressure on the reader),
        # never the ordinary requests read with it.
        for d, request in handshakes:
            await self.lane.park(d, request)
