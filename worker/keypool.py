"""Session RSA key pairs made ahead of time, in low-priority threads of their own.

A handshake needs a new RSA pair (30-150 ms of CPU for 2048 bits). The pool keeps up
to ``SEALSTREAM_HANDSHAKE_POOL`` ready (default 16), so a handshake usually takes one
at once:

- while the worker is quiet (no batch read for a second and nothing in flight,
  start-up included) it makes keys until the pool is full, checking again before
  each key, so work arriving stops the filling after the key in progress;
- once a handshake has taken a key, it keeps ``REFILL_AT_ONCE`` (4, or the size
  if smaller) ready, made at once whatever else the worker is doing;
- a stopping worker makes none (:meth:`KeyPool.stop_filling`).

So a burst of handshakes is served from keys made while the worker had nothing else
to do, and refilling past the first few waits for the next quiet second instead of
taking CPU from the requests that follow the burst (measured: 200 handshakes during
12,000 SK 4 KiB requests/s, request p99 10.0-12.4 ms with a pool of 200 against
17.5-22.9 ms with 4, three alternating pairs at d9d5aa5; README, "Handshakes and
their keys").
A worker under load without a quiet second keeps the four (so does one that a writer
keeps busy with an entry a second: what it had before the pool's size was a
setting). Key generation and the handshake's RSA unwrap run in the pool's own
threads (``SEALSTREAM_HANDSHAKE_CONCURRENCY`` of them), never on the event loop and
never in the threads of ordinary requests. On Linux those threads run at the
lowest CPU priority: on a busy machine a burst of handshakes then takes the CPU
ordinary requests leave over instead of half of it (measured: request latency p50
went from ~9 ms to ~220 ms during 200 handshakes at normal priority).

``SEALSTREAM_HANDSHAKE_PRIORITY``:

- ``idle`` (default): the ``SCHED_IDLE`` policy, on top of nice 19. Linux treats a
  core running only such threads as idle when it places a waking thread, so the
  event loop, Redis and the producers preempt key generation at once. Measured, 200
  handshakes during 4,500 SK 4 KiB requests/s: request p99 9.0-11.4 ms against
  19.9-21.2 ms at nice 19 in two alternating pairs (7.7-13 ms with no handshakes); at
  8,000 req/s 45-67 against 94-99 ms. The cost: handshakes get only spare CPU
  (103-110 against 152-163 of the 200 answered within those 10 s at 8,000 req/s), and
  next to none while every core is busy. Where the system refuses the policy, a
  warning (``handshake_priority_unavailable``) says so and nice 19 stays.
- ``low``: nice 19 alone, which keeps a small share of a busy machine for handshakes.

Elsewhere than Linux both are no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskStatus
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import Gauge

from worker.logging import get_logger

T = TypeVar("T")
log = get_logger("sealstream.worker")
#: The name every handshake-lane thread starts with.
HANDSHAKE_THREADS = "sealstream-handshake"
#: Keys kept ready at any cost once the worker serves handshakes.
REFILL_AT_ONCE = 4
#: How long the worker must read nothing before the pool fills past REFILL_AT_ONCE (s).
QUIET_S = 1.0


def generate(bits: int) -> rsa.RSAPrivateKey:
    """A fresh RSA private key (slow: call it in a thread)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def lower_priority(priority: str) -> None:
    """Give the calling thread the handshake lane's CPU priority (``idle`` or ``low``).

    Linux schedules threads separately: only this thread changes. Lowering one's own
    priority needs no privilege; where a call is missing it is a no-op.
    """
    tid = threading.get_native_id()
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    if priority == "idle" and hasattr(os, "sched_setscheduler"):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:  # a sandbox may refuse it: say so, run at nice 19
            log.warning("handshake_priority_unavailable", priority=priority, errno=exc.errno)


class KeyPool:
    """Up to ``size`` ready key pairs of ``bits`` bits, made in ``threads`` threads.

    ``activity`` counts the worker's work (batches read) and ``busy`` says whether it
    holds any: the pool fills past ``REFILL_AT_ONCE`` only while the count stays the
    same and nothing is held (:meth:`run`).
    """

    def __init__(
        self,
        *,
        bits: int,
        size: int,
        threads: int,
        priority: str = "idle",
        activity: Callable[[], int] = lambda: 0,
        busy: Callable[[], bool] = lambda: False,
        quiet_s: float = QUIET_S,
        ready_gauge: Gauge | None = None,
    ) -> None:
        self.bits = bits
        self.size = size
        self._at_once = min(size, REFILL_AT_ONCE)
        self._activity = activity
        self._busy = busy
        self._quiet_s = quiet_s
        self._gauge = ready_gauge
        self._executor = ThreadPoolExecutor(
            max_workers=threads,
            thread_name_prefix=HANDSHAKE_THREADS,
            initializer=lower_priority,
            initargs=(priority,),
        )
        #: oldest first
        self._ready: deque[rsa.RSAPrivateKey] = deque()
        #: set when a key is taken (wakes :meth:`run`)
        self._taken = anyio.Event()
        #: whether a handshake has taken a key (from then on, REFILL_AT_ONCE are kept)
        self._serving = False
        #: cleared when the worker stops: no more keys made ahead
        self._filling = True
        #: whether :meth:`run` is making a key now, and the event set when it is done
        self._making = False
        self._made = anyio.Event()

    def __len__(self) -> int:
        return len(self._ready)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the pool's threads (the handshake lane)."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def stop_filling(self) -> None:
        """Make no more keys ahead (the worker is stopping); a take still gets one."""
        self._filling = False
        self._taken.set()

    async def take(self) -> rsa.RSAPrivateKey:
        """The oldest ready key pair, or one made now (the one :meth:`run` is making,
        when the pool is empty: it is further along than a new one)."""
        self._serving = True
        self._taken.set()
        if not self._ready and self._making:
            await self._made.wait()
        if self._ready:
            key = self._ready.popleft()
            self._counted()
            return key
        return await self.call(generate, self.bits)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool filled until cancelled.

        Below ``REFILL_AT_ONCE`` after a take: a key at once. Past it, up to ``size``:
        keys while the worker is quiet (``activity`` unchanged for ``quiet_s`` and not
        ``busy``, checked again before each key). A full pool waits for a take, and a
        stopped one (:meth:`stop_filling`) for cancellation.
        """
        task_status.started()
        self._counted()
        try:
            while True:
                taken = self._taken = anyio.Event()
                if not self._filling:
                    await anyio.sleep_forever()
                elif self._serving and len(self._ready) < self._at_once:
                    await self._make()
                elif len(self._ready) >= self.size:
                    await taken.wait()
                elif await self._quiet(taken):
                    mark = self._activity()
                    while (
                        len(self._ready) < self.size
                        and not taken.is_set()
                        and self._activity() == mark
                        and not self._busy()
                    ):
                        await self._make()
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _quiet(self, taken: anyio.Event) -> bool:
        """Whether the worker read nothing for ``quiet_s`` and holds nothing now (False
        at once on a take)."""
        mark = self._activity()
        with anyio.move_on_after(self._quiet_s):
            await taken.wait()
            return False
        return self._activity() == mark and not self._busy()

    async def _make(self) -> None:
        self._making = True
        try:
            self._ready.append(await self.call(generate, self.bits))
            self._counted()
        finally:
            # Wake a take waiting for this key (or, cancelled, to make its own).
            self._making = False
            self._made.set()
            self._made = anyio.Event()

    def _counted(self) -> None:
        if self._gauge is not None:
            self._gauge.set(len(self._ready))
