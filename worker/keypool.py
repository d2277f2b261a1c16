"""Session RSA key pairs made ahead of time, in low-priority threads of their own.

A handshake needs a new RSA pair (35-150 ms of CPU for 2048 bits). The pool keeps a
few ready, refilled in the background once handshakes arrive, so a handshake usually
takes one at once. Key generation and the handshake's RSA unwrap run in the pool's
own threads (``SEALSTREAM_HANDSHAKE_CONCURRENCY`` of them), never on the event loop
and never in the threads of ordinary requests. On Linux those threads run at the
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskStatus
from cryptography.hazmat.primitives.asymmetric import rsa

from worker.logging import get_logger

T = TypeVar("T")
log = get_logger("sealstream.worker")


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
    """Up to ``size`` ready key pairs of ``bits`` bits, made in ``threads`` threads."""

    def __init__(self, *, bits: int, size: int, threads: int, priority: str = "idle") -> None:
        self.bits = bits
        self.size = size
        self._executor = ThreadPoolExecutor(
            max_workers=threads,
            thread_name_prefix="sealstream-handshake",
            initializer=lower_priority,
            initargs=(priority,),
        )
        self._ready: list[rsa.RSAPrivateKey] = []
        self._taken = anyio.Event()

    def __len__(self) -> int:
        return len(self._ready)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the pool's threads (the handshake lane)."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    async def take(self) -> rsa.RSAPrivateKey:
        """A ready key pair, or one made now."""
        self._taken.set()
        if self._ready:
            return self._ready.pop()
        return await self.call(generate, self.bits)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Refill the pool whenever a key is taken, until cancelled.

        It starts filling at the first handshake, so a worker that serves none
        spends nothing on it.
        """
        task_status.started()
        try:
            while True:
                await self._taken.wait()
                self._taken = anyio.Event()
                while len(self._ready) < self.size:
                    self._ready.append(await self.call(generate, self.bits))
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
