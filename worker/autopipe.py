"""Coalescing concurrent Redis commands into shared pipelines (auto-pipelining).

Each in-flight message issues a few short commands (GET the session, SET the replay
record, the reply script, XACK). Sent one by one, redis-py's per-command machinery
dominates the worker's CPU. Here every command is queued, and a few flusher tasks
send whatever has accumulated as one non-transactional pipeline: one round trip and
one connection checkout for the lot. Under no load a batch is a single command, so
latency is unchanged. Blocking reads never come here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

Queue = Callable[[Any], object]
"""Queues exactly one command on the pipeline it is given."""


@dataclass(slots=True)
class _Call:
    queue: Queue
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None


class AutoPipeline:
    """Run it (``await tg.start(pipe.run)``) for as long as anyone calls it."""

    def __init__(self, client: aioredis.Redis, *, flushers: int = 2, max_batch: int = 256) -> None:
        self._redis = client
        self._flushers = flushers
        self._max_batch = max_batch
        self._send: MemoryObjectSendStream[_Call] | None = None
        self.batches = 0
        self.commands = 0

    async def __call__(self, queue: Queue) -> Any:
        """Queue one command and return its reply (or raise its error)."""
        if self._send is None:
            raise RuntimeError("the AutoPipeline is not running")
        call = _Call(queue)
        self._send.send_nowait(call)
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Flush until cancelled."""
        send, recv = anyio.create_memory_object_stream[_Call](math.inf)
        with send, recv:
            self._send = send
            try:
                async with anyio.create_task_group() as tg:
                    for _ in range(self._flushers):
                        tg.start_soon(self._flush_loop, recv)
                    task_status.started()
            finally:
                self._send = None

    async def _flush_loop(self, recv: MemoryObjectReceiveStream[_Call]) -> None:
        while True:
            batch = [await recv.receive()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(recv.receive_nowait())
                except anyio.WouldBlock:
                    break
            await self._flush(batch)

    async def _flush(self, batch: list[_Call]) -> None:
        self.batches += 1
        self.commands += len(batch)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for call in batch:
                    call.queue(pipe)
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # a connection failure fails every command in it
            for call in batch:
                call.error = exc
                call.done.set()
            return
        for call, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                call.error = result
            else:
                call.result = result
            call.done.set()
