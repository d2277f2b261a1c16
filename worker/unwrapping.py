"""RSA unwraps in child processes (``SEALSTREAM_UNWRAP_PROCESSES``).

cryptography lets go of the GIL while it decrypts, but an unwrap thread needs the GIL
back between two decrypts, and while the event loop runs Python (a batch of handlers,
sealing replies) it waits for it: up to the interpreter's switch interval (5 ms) for a
~0.3-0.5 ms decrypt. Child processes have a GIL each, so the loop's Python and the
unwraps no longer wait for each other.

::

    Intake (a chunk of RSA requests) -> UnwrapPool.unwrap([(private key DER, wrapped)])
      -> an idle child (worker.unwrap_child): one request frame on its stdin
      -> one answer frame on its stdout: a 32-byte key per item
      -> Intake opens the payloads (AES-GCM) on the loop, as with threads

The children are started the first time a chunk needs them (a worker that only sees
session-key requests starts none; a child is ready ~50 ms later); until then, and for
a chunk whose child died, the caller unwraps in threads. A child that dies is started
again. Session private keys cross a pipe to the worker's own child, never Redis or a
log. When the worker stops, it closes the children's stdin and they exit.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
from anyio.abc import Process, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client import Gauge

from worker.logging import get_logger
from worker.unwrap_child import MAX_FRAME, Item, decode_answer, encode_request

log = get_logger("sealstream.worker")

#: the child: its file run by path, isolated (-I: no user site, no script directory
#: on sys.path, so nothing under worker/ shadows a standard module)
CHILD_COMMAND = (sys.executable, "-I", str(Path(__file__).with_name("unwrap_child.py")))
#: seconds before a child that died is started again
RESTART_S = 1.0
#: seconds a child gets to say it is ready
READY_S = 30.0
#: seconds a stopping worker waits for a child to exit before killing it
EXIT_S = 2.0


# -- the worker's side -----------------------------------------------------------------


class _Child:
    """One child process and the reader of its answers."""

    def __init__(self, process: Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.stdin = process.stdin
        self.stdout = BufferedByteReceiveStream(process.stdout)

    async def call(self, frame: bytes, count: int) -> list[bytes]:
        """Send a request frame; its ``count`` keys."""
        await self.stdin.send(frame)
        return await self.answer(count)

    async def answer(self, count: int) -> list[bytes]:
        """The next answer frame, of ``count`` keys (0: the child is ready)."""
        size = int.from_bytes(await self.stdout.receive_exactly(4), "big")
        if size > MAX_FRAME:
            raise ValueError("unwrap answer too large")
        return decode_answer(await self.stdout.receive_exactly(size), count)

    async def close(self) -> None:
        """Close its stdin (it exits), wait a little, then kill it."""
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await self.stdin.aclose()
            with anyio.move_on_after(EXIT_S):
                await self.process.wait()
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
            await self.process.aclose()  # its pipes, and the wait


class UnwrapPool:
    """Up to ``processes`` children doing RSA unwraps. Run :meth:`run` while it is used."""

    def __init__(self, processes: int, *, gauge: Gauge | None = None) -> None:
        self.processes = processes
        #: chunks unwrapped by a child (the rest went to threads)
        self.calls = 0
        #: children started, restarts included
        self.started = 0
        self._wanted = anyio.Event()
        self._live = 0
        self._dead = anyio.Event()
        #: the children not in a call (created by :meth:`run`)
        self._idle: tuple[MemoryObjectSendStream[_Child], MemoryObjectReceiveStream[_Child]]
        self._children: set[_Child] = set()
        #: children lost since the last restart, to reap
        self._gone: list[_Child] = []
        self._gauge = gauge
        #: children that failed to start in a row
        self._failures = 0

    @property
    def live(self) -> int:
        """Children running now."""
        return self._live

    async def unwrap(self, items: Sequence[Item]) -> list[bytes] | None:
        """The unwrapped keys of ``items`` from a child, or None: no child is up (the
        caller unwraps in threads). Waits for a busy child when some are up."""
        if not self.processes:
            return None
        if not self._live:
            self._wanted.set()
            return None
        child: _Child | None = None
        # A child lost meanwhile is started again after RESTART_S: threads until then.
        with anyio.move_on_after(RESTART_S):
            try:
                child = await self._idle[1].receive()
            except (anyio.ClosedResourceError, anyio.EndOfStream):
                return None  # the pool has stopped
        if child is None:
            return None
        try:
            keys = await child.call(encode_request(items), len(items))
        except Exception as exc:
            # The child died, or answered out of step.
            self._lost(child)
            log.warning("unwrap_process_lost", error_type=type(exc).__name__)
            return None
        except BaseException:
            # Cancelled mid-frame: its pipe is out of step.
            self._lost(child)
            raise
        self.calls += 1
        self._idle[0].send_nowait(child)
        return keys

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the children once wanted, start again those that die, and stop them
        all when cancelled."""
        if not self.processes:
            task_status.started()
            return
        self._idle = anyio.create_memory_object_stream[_Child](math.inf)
        task_status.started()
        try:
            await self._wanted.wait()
            while True:
                self._dead = anyio.Event()
                for child in self._gone:
                    await child.close()  # reaped (it was killed)
                self._gone.clear()
                if self._live < self.processes:
                    async with anyio.create_task_group() as tg:
                        for _ in range(self.processes - self._live):
                            tg.start_soon(self._start)
                    continue
                await self._dead.wait()
                await anyio.sleep(RESTART_S)
        finally:
            with anyio.CancelScope(shield=True):
                for child in [*self._children, *self._gone]:
                    await child.close()
                for stream in self._idle:
                    stream.close()
                self._children.clear()
                self._set_live(0)

    async def _start(self) -> None:
        """Start a child and wait for it to say it is ready."""
        try:
            process = await anyio.open_process(
                CHILD_COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None
            )
        except OSError as exc:
            await self._failed(exc)
            return
        child = _Child(process)
        try:
            with anyio.fail_after(READY_S):
                await child.answer(0)
        except Exception as exc:
            await child.close()
            await self._failed(exc)
            return
        except BaseException:
            await child.close()
            raise
        self._failures = 0
        self._children.add(child)
        self._set_live(self._live + 1)
        self.started += 1
        self._idle[0].send_nowait(child)

    async def _failed(self, exc: Exception) -> None:
        """Log a child that did not start, and wait before the next try (1 s, doubling
        up to 32 s while they keep failing; threads unwrap meanwhile)."""
        # No traceback: the error type is enough to act on.
        log.error("unwrap_process_failed_to_start", error_type=type(exc).__name__)
        self._failures += 1
        await anyio.sleep(RESTART_S * 2 ** min(self._failures - 1, 5))

    def _lost(self, child: _Child) -> None:
        if child in self._children:
            self._children.discard(child)
            self._gone.append(child)
            self._set_live(self._live - 1)
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            self._dead.set()

    def _set_live(self, live: int) -> None:
        self._live = live
        if self._gauge is not None:
            self._gauge.set(live)
