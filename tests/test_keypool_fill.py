"""How the key pool fills: while the worker is quiet up to its size, four at once once
it serves handshakes, oldest first, nothing once the worker stops.

Real keys (1024 bits: quick to make) in a real thread at nice 19, and an activity
counter the test moves as a worker's reads would.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry, Gauge

from tests.helpers import wait_until
from worker import keypool
from worker.errors import ConfigError
from worker.keypool import KeyPool
from worker.settings import Settings

pytestmark = pytest.mark.anyio

#: Key generation at nice 19 on a busy CI machine can be slow: generous waits.
_WAIT_S = 60.0


class _Pool:
    """A running pool, its gauge's registry, and a busy flag the test sets."""

    def __init__(self, pool: KeyPool, registry: CollectorRegistry, busy: list[bool]) -> None:
        self.pool = pool
        self.registry = registry
        self.busy = busy

    def __len__(self) -> int:
        return len(self.pool)

    def gauge(self) -> float | None:
        return self.registry.get_sample_value("keys_ready")

    async def holds(self, count: int) -> None:
        await wait_until(lambda: len(self.pool) == count, timeout=_WAIT_S)


@contextlib.asynccontextmanager
async def _running(
    size: int, activity: Callable[[], int], quiet_s: float = 0.1
) -> AsyncIterator[_Pool]:
    registry = CollectorRegistry()
    busy = [False]
    pool = KeyPool(
        bits=1024,
        size=size,
        threads=1,
        priority="low",
        activity=activity,
        busy=lambda: busy[0],
        quiet_s=quiet_s,
        ready_gauge=Gauge("keys_ready", "test", registry=registry),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        yield _Pool(pool, registry, busy)
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _reading(work: list[int], every_s: float = 0.01) -> AsyncIterator[None]:
    """A worker reading a batch every ``every_s``, for the block."""

    async def read() -> None:
        while True:
            work[0] += 1
            await anyio.sleep(every_s)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        yield
        tg.cancel_scope.cancel()


async def _stays(pool: _Pool, count: int, seconds: float) -> None:
    """``pool`` holds ``count`` keys throughout ``seconds`` (checked every 10 ms)."""
    with anyio.move_on_after(seconds):
        while True:
            assert count == len(pool)
            await anyio.sleep(0.01)


async def test_a_quiet_worker_fills_the_pool_to_its_size_and_no_further() -> None:
    """Nothing read for ``quiet_s`` and nothing held: keys are made until the pool
    holds ``size``, which the gauge shows."""
    async with _running(3, lambda: 0) as pool:
        await pool.holds(3)
        await _stays(pool, 3, 0.3)
        assert 3.0 == pool.gauge()


async def test_a_worker_reading_batches_makes_no_key_ahead_until_it_is_quiet() -> None:
    """While batches keep being read (more often than ``quiet_s``), before any
    handshake the pool stays empty; the first quiet spell fills it."""
    work = [0]
    async with _running(3, lambda: work[0]) as pool:
        async with _reading(work):
            await _stays(pool, 0, 0.5)
        await pool.holds(3)


async def test_a_worker_holding_entries_makes_no_key_ahead() -> None:
    """No batch read, but entries still in flight (long handlers, a grace period):
    not quiet, no key made ahead; once they are done, the pool fills."""
    async with _running(3, lambda: 0) as pool:
        pool.busy[0] = True
        await _stays(pool, 0, 0.5)
        pool.busy[0] = False
        await pool.holds(3)


async def test_work_arriving_stops_the_filling_after_the_key_in_progress() -> None:
    """The quiet check is made again before each key: once batches are read, at most
    the key being made is added."""
    work = [0]
    async with _running(1000, lambda: work[0]) as pool:
        await wait_until(lambda: len(pool) >= 1, timeout=_WAIT_S)
        async with _reading(work):
            started_with = len(pool)
            with anyio.move_on_after(0.5):
                while True:
                    assert len(pool) <= started_with + 1
                    await anyio.sleep(0.01)


async def test_after_a_take_a_busy_worker_keeps_four_ready_and_no_more() -> None:
    """Once a handshake has taken a key, REFILL_AT_ONCE (4) are made at once even while
    the worker reads batches; the rest of the pool waits for a quiet spell."""
    assert 4 == keypool.REFILL_AT_ONCE
    work = [0]
    async with _running(8, lambda: work[0]) as pool:
        async with _reading(work):
            key = await pool.pool.take()  # the pool was empty: made now
            assert 1024 == key.key_size
            await pool.holds(4)
            await _stays(pool, 4, 0.5)
            assert 4.0 == pool.gauge()
        await pool.holds(8)


async def test_a_take_gets_the_oldest_key_and_a_busy_worker_makes_it_good_at_once() -> None:
    """A take from a full pool returns the oldest key (the gauge drops by one), and the
    pool is made full again at once although the worker is reading batches."""
    work = [0]
    async with _running(3, lambda: work[0]) as pool:
        await pool.holds(3)
        oldest = pool.pool._ready[0]
        async with _reading(work):
            assert oldest is await pool.pool.take()
            assert 2.0 == pool.gauge()
            await pool.holds(3)
            assert 3.0 == pool.gauge()


async def test_a_take_from_an_empty_pool_gets_the_key_being_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool is empty while a key is being made for it: a take waits for that key
    rather than queueing a second one behind it (keys handed out in the order they
    are asked for: the first is held back until the take waits)."""
    made = [keypool.generate(1024) for _ in range(3)]
    calls: list[int] = []
    release = threading.Event()

    def generate(bits: int) -> rsa.RSAPrivateKey:
        calls.append(bits)
        if len(calls) == 1:
            release.wait(_WAIT_S)
        return made[len(calls) - 1]

    monkeypatch.setattr(keypool, "generate", generate)
    async with _running(1, lambda: 0, quiet_s=0.01) as pool:
        await wait_until(lambda: pool.pool._making, timeout=_WAIT_S, interval=0.001)
        async with anyio.create_task_group() as tg:
            took: list[rsa.RSAPrivateKey] = []

            async def take() -> None:
                took.append(await pool.pool.take())

            tg.start_soon(take)
            await anyio.sleep(0.05)  # the take is waiting
            release.set()
        assert made[0] is took[0]


async def test_a_stopped_pool_makes_no_more_keys_but_a_take_still_gets_one() -> None:
    """``stop_filling`` (the worker is stopping): nothing more is made ahead, not even
    after a take; a take on the empty pool makes its own key."""
    async with _running(50, lambda: 0) as pool:
        await wait_until(lambda: len(pool) >= 1, timeout=_WAIT_S)
        pool.pool.stop_filling()
        await anyio.sleep(0.3)  # the key in progress, if any, lands
        kept = len(pool)
        await _stays(pool, kept, 0.3)
        for _ in range(kept + 1):
            assert 1024 == (await pool.pool.take()).key_size
        await _stays(pool, 0, 0.3)


async def test_a_pool_of_size_zero_keeps_nothing_and_makes_each_key_on_demand() -> None:
    """``SEALSTREAM_HANDSHAKE_POOL=0``: every take makes its key; none is kept."""
    async with _running(0, lambda: 0, quiet_s=0.01) as pool:
        assert 1024 == (await pool.pool.take()).key_size
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


def test_a_worker_exits_without_waiting_for_a_key_being_made() -> None:
    """``sealstream worker`` exits at once past threads that outlived it (``os._exit``);
    a handshake-lane thread still making a key is one it does not wait for, and not
    a stuck handler: no ``exit_past_stuck_handlers`` warning (run in a child: the
    exit would end this process)."""
    code = (
        "import threading, time\n"
        "from worker.cli import _exit_past_stuck_threads\n"
        "t = threading.Thread(target=time.sleep, args=(60,), name='sealstream-handshake_0')\n"
        "t.start()\n"
        "_exit_past_stuck_threads()\n"
        "print('returned')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert (0, "") == (out.returncode, out.stdout)
    assert "exit_past_stuck_handlers" not in out.stderr
