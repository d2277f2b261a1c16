"""The handshake lane's threads run at the lowest CPU priority, and only they do; the
key pool fills while the worker is quiet and keeps four ready once it serves
handshakes."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
from prometheus_client import CollectorRegistry, Gauge

from tests.helpers import wait_until
from worker import keypool
from worker.errors import ConfigError
from worker.keypool import KeyPool
from worker.settings import Settings

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are Linux's"),
]


def _priority() -> tuple[int, int]:
    """(scheduling policy, nice value) of the calling thread."""
    return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def _lane_priority(priority: str) -> tuple[int, int]:
    pool = KeyPool(bits=2048, size=1, threads=1, priority=priority)
    try:
        return await pool.call(_priority)
    finally:
        pool._executor.shutdown(wait=True)


async def test_the_idle_priority_runs_the_lane_under_sched_idle_at_nice_19() -> None:
    """``idle`` (the default): the lane's thread runs under SCHED_IDLE, at nice 19."""
    assert (os.SCHED_IDLE, 19) == await _lane_priority("idle")
    assert "idle" == Settings().handshake_priority


async def test_the_low_priority_runs_the_lane_at_nice_19_under_the_normal_policy() -> None:
    """``low``: nice 19 under the normal policy, so it keeps a share of a busy machine."""
    assert (os.SCHED_OTHER, 19) == await _lane_priority("low")


def test_only_the_lanes_threads_are_lowered() -> None:
    """A thread that makes a pool and runs work through it keeps its own priority: set
    to (SCHED_OTHER, nice 7) first, so the check holds whatever ran before it."""
    seen: list[tuple[int, int]] = []

    def caller() -> None:
        tid = threading.get_native_id()
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, 7)
        except OSError:
            return  # not allowed here (not root, or a lowered thread): nothing to check
        seen.append(_priority())
        seen.append(anyio.run(_lane_priority, "idle"))
        seen.append(_priority())

    t = threading.Thread(target=caller)
    t.start()
    t.join()
    if not seen:
        pytest.skip("this process may not set a thread's priority back")
    assert [(os.SCHED_OTHER, 7), (os.SCHED_IDLE, 19), (os.SCHED_OTHER, 7)] == seen


async def test_a_refused_idle_policy_is_logged_and_nice_19_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the system refuses SCHED_IDLE (a sandbox), the lane says so in a warning
    and its threads still run at nice 19."""
    warned: list[str] = []

    class Log:
        def warning(self, event: str, **fields: object) -> None:
            warned.append(event)

    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    monkeypatch.setattr(keypool, "log", Log())
    assert (os.SCHED_OTHER, 19) == await _lane_priority("idle")
    assert ["handshake_priority_unavailable"] == warned


# -- how the pool fills -------------------------------------------------------------------
#
# Real keys (1024 bits: quick to make), a real thread, and an activity counter the test
# moves as a worker's reads would.


@contextlib.asynccontextmanager
async def _running(
    size: int, activity: Callable[[], int], quiet_s: float = 0.1
) -> AsyncIterator[tuple[KeyPool, Gauge]]:
    gauge = Gauge("keys_ready", "test", registry=CollectorRegistry())
    pool = KeyPool(
        bits=1024,
        size=size,
        threads=1,
        priority="low",
        activity=activity,
        quiet_s=quiet_s,
        ready_gauge=gauge,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        yield pool, gauge
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _busy(work: list[int], every_s: float = 0.01) -> AsyncIterator[None]:
    """A worker reading a batch every ``every_s``, for the block."""

    async def read() -> None:
        while True:
            work[0] += 1
            await anyio.sleep(every_s)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        yield
        tg.cancel_scope.cancel()


async def _stays(pool: KeyPool, count: int, seconds: float) -> None:
    """``pool`` holds ``count`` keys throughout ``seconds`` (checked every 10 ms)."""
    with anyio.move_on_after(seconds):
        while True:
            assert count == len(pool)
            await anyio.sleep(0.01)


async def test_a_quiet_worker_fills_the_pool_to_its_size_and_no_further() -> None:
    """Nothing read for ``quiet_s``: keys are made until the pool holds ``size``, which
    the gauge shows."""
    async with _running(3, lambda: 0) as (pool, gauge):
        await wait_until(lambda: len(pool) == 3)
        await _stays(pool, 3, 0.3)
        assert 3.0 == gauge._value.get()


async def test_a_busy_worker_makes_no_key_ahead_until_it_is_quiet() -> None:
    """While batches keep being read (more often than ``quiet_s``), before any
    handshake the pool stays empty; the first quiet spell fills it."""
    work = [0]
    async with _running(3, lambda: work[0], quiet_s=0.1) as (pool, _):
        async with _busy(work):
            await _stays(pool, 0, 0.5)
        await wait_until(lambda: len(pool) == 3)


async def test_after_a_take_a_busy_worker_keeps_four_ready_and_no_more() -> None:
    """Once a handshake has taken a key, REFILL_AT_ONCE (4) are made at once even while
    the worker is busy; the rest of the pool waits for a quiet spell."""
    assert 4 == keypool.REFILL_AT_ONCE
    work = [0]
    async with _running(8, lambda: work[0]) as (pool, gauge):
        async with _busy(work):
            key = await pool.take()  # the pool was empty: made now
            assert 1024 == key.key_size
            await wait_until(lambda: len(pool) == 4)
            await _stays(pool, 4, 0.5)
            assert 4.0 == gauge._value.get()
        await wait_until(lambda: len(pool) == 8)


async def test_a_take_from_a_full_pool_is_made_good_at_once() -> None:
    """A take from a full pool returns a ready key (the gauge drops) and the pool is
    back to its size."""
    async with _running(2, lambda: 0) as (pool, gauge):
        await wait_until(lambda: len(pool) == 2)
        ready = list(pool._ready)
        key = await pool.take()
        assert any(key is k for k in ready)
        await wait_until(lambda: len(pool) == 2)
        assert 2.0 == gauge._value.get()


async def test_a_pool_of_size_zero_keeps_nothing_and_makes_each_key_on_demand() -> None:
    """``SEALSTREAM_HANDSHAKE_POOL=0``: every take makes its key; none is kept."""
    async with _running(0, lambda: 0, quiet_s=0.01) as (pool, _):
        assert 1024 == (await pool.take()).key_size
        await _stays(pool, 0, 0.2)


def test_the_pool_size_is_a_setting() -> None:
    """``SEALSTREAM_HANDSHAKE_POOL`` (default 16, 0 to 10,000); anything else is a
    ConfigError naming it."""
    assert 16 == Settings().handshake_pool
    assert 200 == Settings.from_env({"SEALSTREAM_HANDSHAKE_POOL": "200"}).handshake_pool
    assert 0 == Settings.from_env({"SEALSTREAM_HANDSHAKE_POOL": "0"}).handshake_pool
    for bad in ("-1", "10001", "many"):
        with pytest.raises(ConfigError, match="SEALSTREAM_HANDSHAKE_POOL"):
            Settings.from_env({"SEALSTREAM_HANDSHAKE_POOL": bad})
