"""Read-ahead: deep for handlers that keep up, shallow for handlers that do not.

The policy (``worker.readahead``) is checked alone, then on a real Redis: a worker
draining fast handlers deepens its read-ahead and answers everything; a worker whose
handlers are slow never holds more than ``concurrency`` entries beyond them.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests import helpers
from tests.helpers import Raw, Rig, wait_until
from worker import handshake_lane, readahead, wire
from worker.errors import AuthFailed
from worker.handlers import App
from worker.readahead import BUDGET_BYTES, DEEPEST, ReadAhead
from worker.runtime import Worker
from worker.settings import Settings
from worker.slots import Slots
from worker.streams import Store
from worker.testing import ThrowawayKeys

pytestmark = pytest.mark.anyio


def _policy(concurrency: int = 4, *, adaptive: bool = True) -> tuple[Slots, ReadAhead]:
    slots = Slots(concurrency * 2)
    return slots, ReadAhead(slots, concurrency=concurrency, start=concurrency, adaptive=adaptive)


async def test_idle_handlers_alone_do_not_deepen() -> None:
    """Handlers with nothing to do while the reader has free slots: no change."""
    slots, ra = _policy()
    ra.handlers_idle()
    assert (4, 8) == (ra.depth, slots.limit)


async def test_a_starved_reader_and_idle_handlers_double_the_depth_up_to_the_deepest() -> None:
    """Each time the reader waited for a slot while handlers were idle, the depth
    doubles, up to ``DEEPEST``; the slots follow."""
    slots, ra = _policy()
    depths = []
    for _ in range(12):
        ra.starved()
        ra.handlers_idle()
        depths.append(ra.depth)
    assert [8, 16, 32, 64, 128, 256, 512] == depths[:7]
    assert DEEPEST == depths[-1]
    assert 4 + DEEPEST == slots.limit


async def test_a_job_waiting_for_a_handler_goes_back_to_the_start() -> None:
    """One job that waits for a handler takes the depth back to the start at once."""
    slots, ra = _policy()
    for _ in range(3):
        ra.starved()
        ra.handlers_idle()
    ra.handlers_busy()
    assert (4, 8) == (ra.depth, slots.limit)
    ra.handlers_idle()  # the starvation seen before the busy signal is forgotten
    assert 4 == ra.depth


async def test_the_byte_budget_caps_the_depth_by_the_mean_entry_size() -> None:
    """Large entries: the depth stops where the read-ahead would pass the byte budget."""
    _, ra = _policy()
    ra.read(10, 10 * 1024 * 1024)  # 1 MiB entries
    for _ in range(12):
        ra.starved()
        ra.handlers_idle()
    assert BUDGET_BYTES // (1024 * 1024) == ra.depth


async def test_a_read_of_larger_entries_lowers_the_depth_at_once() -> None:
    """Deep on small entries, then reads of 1 MiB entries: within a few reads the
    depth is down to what the byte budget allows, and stays there."""
    _, ra = _policy()
    ra.read(1_000_000, 200 * 1_000_000)  # a long run of 200-byte entries
    for _ in range(12):
        ra.starved()
        ra.handlers_idle()
    assert DEEPEST == ra.depth
    for _ in range(16):
        ra.starved()  # still busy: only the budget moves the depth
        ra.read(100, 100 * 1024 * 1024)
    assert ra.depth * 1024 * 1024 <= BUDGET_BYTES * 1.05
    for _ in range(12):
        ra.starved()
        ra.handlers_idle()
    assert 4 <= ra.depth <= ra.ceiling()
    assert ra.depth * 1024 * 1024 <= BUDGET_BYTES * 1.05


async def test_a_deep_read_ahead_decays_once_the_reader_stops_waiting() -> None:
    """Deep after a burst, then reads with free slots for over IDLE_S: each read halves
    the depth, down to the start."""
    now = [1000.0]
    ra = ReadAhead(Slots(8), concurrency=4, start=4, adaptive=True, clock=lambda: now[0])
    for _ in range(12):
        ra.starved()
        ra.handlers_idle()
    assert DEEPEST == ra.depth
    ra.read(1, 100)
    assert DEEPEST == ra.depth  # the reader waited just now
    now[0] += readahead.IDLE_S + 0.1
    depths = []
    for _ in range(10):
        ra.read(1, 100)
        depths.append(ra.depth)
    assert [256, 128, 64, 32, 16, 8, 4, 4] == depths[:8]


async def test_a_fixed_prefetch_never_moves() -> None:
    """With SEALSTREAM_PREFETCH set the read-ahead is what it says."""
    slots, ra = _policy(adaptive=False)
    ra.starved()
    ra.handlers_idle()
    assert (4, 8) == (ra.depth, slots.limit)


async def test_a_lowered_limit_hands_out_no_slot_until_enough_come_back() -> None:
    """Slots taken above a lowered limit stay taken; a take waits until the count is
    under the new limit."""
    slots = Slots(8)
    assert 8 == await slots.take(8)
    slots.resize(4)
    slots.give(3)
    assert 0 == slots.free
    slots.give(2)
    assert 1 == slots.free
    assert 1 == await slots.take(8)


def _app(calls: Counter[str], gate: anyio.Event) -> App:
    app = App()

    @app.handler("echo")
    async def echo(payload: Any) -> Any:
        calls["echo"] += 1
        return payload

    @app.handler("hold")
    async def hold(payload: Any) -> Any:
        calls["hold"] += 1
        await gate.wait()
        return payload

    return app


def _serving(
    settings: Settings,
    keys: ThrowawayKeys,
    redis: aioredis.Redis,
    calls: Counter[str],
    gate: anyio.Event,
    **changes: Any,
) -> AbstractAsyncContextManager[Rig]:
    """A worker running ``_app`` with ``settings`` changed by ``changes``."""
    return helpers.serving(_app(calls, gate), calls, settings, keys, redis, **changes)


async def _prefill(raw: Raw, type_: str, n: int) -> list[str]:
    grant = await raw.grant()
    mids = []
    async with raw.redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            out = raw.seal(grant, {"i": i}, type_=type_)
            mids.append(out.request.mid)
            pipe.xadd(raw.names.request_stream(0), wire.encode_request(out.request))
        await pipe.execute()
    return mids


def _depths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every depth the read-ahead is set to from now on (a drain may deepen it and a
    busy moment take it back before the drain ends: the gauge alone may miss it)."""
    seen: list[int] = []
    set_depth = ReadAhead._set

    def recording(self: ReadAhead, depth: int) -> None:
        seen.append(depth)
        set_depth(self, depth)

    monkeypatch.setattr(ReadAhead, "_set", recording)
    return seen


async def _most_pending(raw: Raw) -> int:
    """The most entries pending over 0.4 s, once the reader has long since taken all
    it may (proving that it takes no more needs a window)."""
    most = 0
    for _ in range(20):
        most = max(most, await raw.pending())
        await anyio.sleep(0.02)
    return most


async def test_fast_handlers_deepen_the_read_ahead_and_every_request_is_answered(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,200 pre-filled requests to a handler that returns at once, concurrency 2: the
    read-ahead grows past its start of 2 and every request is answered once."""
    depths = _depths(monkeypatch)
    raw = Raw(redis, settings.prefix, keys)
    await _prefill(raw, "echo", 1200)
    calls: Counter[str] = Counter()
    async with _serving(
        settings, keys, redis, calls, anyio.Event(), concurrency=2, prefetch=None
    ) as rig:
        await rig.raw.wait_drained(timeout=60)
    assert max(depths, default=2) > 2
    assert 1200 == calls["echo"]


async def test_slow_handlers_never_hold_more_than_concurrency_beyond_them(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """100 pre-filled requests to handlers that wait, concurrency 2: while both handlers
    wait, the worker holds at most 4 entries (2 running, 2 read ahead), the read-ahead
    stays at its start, and once released every request is answered."""
    raw = Raw(redis, settings.prefix, keys)
    await _prefill(raw, "hold", 100)
    calls: Counter[str] = Counter()
    gate = anyio.Event()
    async with _serving(settings, keys, redis, calls, gate, concurrency=2, prefetch=None) as rig:
        await wait_until(lambda: calls["hold"] >= 2, timeout=10)
        most = await _most_pending(rig.raw)
        assert most <= 4
        assert 2 == rig.worker.metrics.read_ahead._value.get()
        gate.set()
        await rig.raw.wait_drained(timeout=60)
    assert 100 == calls["hold"]


async def test_jobs_waiting_for_handlers_take_a_deep_read_ahead_back_to_the_start(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deepened by a drain of fast handlers, the read-ahead goes back to its start once
    jobs wait for the two handlers (which now hold on a gate). (No decay meanwhile:
    that is the policy test's; and while the drain deepens it, a job waiting for a
    handler, which may happen on a busy machine, does not take it back yet: the drop
    under test is the one the held jobs cause.)"""
    monkeypatch.setattr(readahead, "IDLE_S", 3600.0)
    drop_back = ReadAhead.handlers_busy
    monkeypatch.setattr(ReadAhead, "handlers_busy", lambda self: None)
    raw = Raw(redis, settings.prefix, keys)
    await _prefill(raw, "echo", 1200)
    calls: Counter[str] = Counter()
    gate = anyio.Event()
    async with _serving(settings, keys, redis, calls, gate, concurrency=2, prefetch=None) as rig:
        await rig.raw.wait_drained(timeout=60)
        gauge = rig.worker.metrics.read_ahead._value
        assert gauge.get() > 2
        monkeypatch.setattr(ReadAhead, "handlers_busy", drop_back)
        await _prefill(raw, "hold", 10)
        await wait_until(lambda: gauge.get() == 2, timeout=10)
        gate.set()
        await rig.raw.wait_drained(timeout=60)
    assert (1200, 10) == (calls["echo"], calls["hold"])


async def test_entries_in_a_stalled_write_hold_no_slot(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for 2 entries (fixed prefetch) and the writers' script calls held up,
    the reader goes on reading: the entries in a write no longer count. Each of the two
    writers holds at least one entry in its call, so at least 4 are read (only 2 if
    they held their slots; how many more depends on how the writers' takes fall);
    once the writes go through, every request is answered once."""
    gate = anyio.Event()
    finish = Store.finish

    async def held(self: Store, items: Any) -> Any:
        await gate.wait()
        return await finish(self, items)

    monkeypatch.setattr(Store, "finish", held)
    raw = Raw(redis, settings.prefix, keys)
    await _prefill(raw, "echo", 40)
    calls: Counter[str] = Counter()
    async with _serving(settings, keys, redis, calls, gate, concurrency=1, prefetch=1) as rig:
        await wait_until(lambda: calls["echo"] >= 4, timeout=10)
        assert await rig.raw.pending() >= 4
        gate.set()
        await rig.raw.wait_drained(timeout=30)
    assert 40 == calls["echo"]


async def test_quiet_shards_hold_only_their_share_and_a_trickle_does_not_deepen(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four shards, concurrency 8 (a starting limit of 16, 4 a shard): a drain of
    shard 0 deepens the read-ahead, yet the readers blocked on the quiet shards hold
    only their share of the starting limit; back at the start, single requests one at
    a time (one asked for proves nothing) leave it there."""
    raw = Raw(redis, settings.prefix, keys)
    await _prefill(raw, "echo", 1200)
    calls: Counter[str] = Counter()
    depths = _depths(monkeypatch)
    async with _serving(
        settings, keys, redis, calls, anyio.Event(), concurrency=8, prefetch=None, shards=4
    ) as rig:
        await rig.raw.wait_drained(timeout=60)
        gauge = rig.worker.metrics.read_ahead._value
        assert max(depths, default=8) > 8
        slots = rig.worker._slots
        await wait_until(lambda: slots.taken <= 16, timeout=5)
        rig.worker.handlers_busy()  # back to the start, as when jobs wait
        grant = await raw.grant()
        for i in range(6):
            out = raw.seal(grant, {"i": i})
            await raw.send(out.request, shard=i % 4)
            await raw.reply(grant.sid, out.request.mid)
        assert 8 == gauge.get()
    assert 1206 == calls["echo"]


async def test_reads_of_one_entry_never_deepen_the_read_ahead(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Four shards, concurrency 2 (a share of one slot a shard): every read asks for
    one entry and comes back full, which proves nothing about a backlog, so single
    requests one at a time leave the read-ahead at its start."""
    calls: Counter[str] = Counter()
    async with _serving(
        settings, keys, redis, calls, anyio.Event(), concurrency=2, prefetch=None, shards=4
    ) as rig:
        grant = await rig.raw.grant()
        for i in range(12):
            out = rig.raw.seal(grant, {"i": i})
            await rig.raw.send(out.request, shard=i % 4)
            await rig.raw.reply(grant.sid, out.request.mid)
        assert 2 == rig.worker.metrics.read_ahead._value.get()
    assert 12 == calls["echo"]


async def test_a_full_handshake_lane_does_not_deepen_the_read_ahead(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handshakes waiting for a full lane (backlog 2, a slow lane) hold their slots:
    the reader waits for slots, but that is the lane's doing, so the read-ahead stays
    at its start and the worker holds no more than a few entries beyond the lane."""
    monkeypatch.setattr(handshake_lane, "HANDSHAKE_BACKLOG", 2)
    lane_gate = anyio.Event()
    served = [0]

    async def slow(self: Any, d: Any, request: Any) -> None:
        served[0] += 1
        await lane_gate.wait()
        raise AuthFailed("unknown kid")

    monkeypatch.setattr(handshake_lane.HandshakeLane, "_handshake", slow)
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with raw.redis.pipeline(transaction=False) as pipe:
        for i in range(400):
            request = (
                helpers.handshake(keys).request if i % 2 else raw.seal(grant, {"i": i}).request
            )
            pipe.xadd(raw.names.request_stream(0), wire.encode_request(request))
        await pipe.execute()
    calls: Counter[str] = Counter()
    async with _serving(
        settings,
        keys,
        redis,
        calls,
        anyio.Event(),
        concurrency=2,
        prefetch=None,
        handshake_concurrency=1,
    ) as rig:
        await wait_until(lambda: served[0] >= 1 and calls["echo"] >= 1, timeout=10)
        most = await _most_pending(rig.raw)
        assert 2 == rig.worker.metrics.read_ahead._value.get()
        assert most <= 12
        lane_gate.set()
        await rig.raw.wait_drained(timeout=60)


async def test_a_quiet_shard_has_one_read_waiting_and_a_backlog_two_in_flight(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shards, concurrency 8, fixed prefetch 56 (64 slots): an idle worker has one
    read blocked on each shard; draining 1,200 requests pre-filled on shard 0, a
    second reader joins while its reads come back full, so two reads of it are in
    flight at once (one on its way while the last one's batch is processed). Every
    request is answered once, and the idle worker is back to one read a shard."""
    in_flight: Counter[int] = Counter()
    most: Counter[int] = Counter()
    read = Store.read

    async def counting(self: Store, shard: int, *args: Any, **kwargs: Any) -> Any:
        in_flight[shard] += 1
        most[shard] = max(most[shard], in_flight[shard])
        try:
            return await read(self, shard, *args, **kwargs)
        finally:
            in_flight[shard] -= 1

    calls: Counter[str] = Counter()
    async with _serving(
        settings, keys, redis, calls, anyio.Event(), concurrency=8, prefetch=56, shards=2
    ) as rig:
        name = f"sealstream-worker:{rig.worker.consumer}"

        async def one_read_a_shard() -> bool:
            blocked = [
                c
                for c in await redis.client_list()
                if c["name"] == name and c["cmd"] == "xreadgroup" and "b" in c["flags"]
            ]
            return len(blocked) == 2 and in_flight == Counter({0: 1, 1: 1})

        monkeypatch.setattr(Store, "read", counting)
        await wait_until(one_read_a_shard, timeout=10)  # each reader back in a counted read
        most.clear()
        await _prefill(rig.raw, "echo", 1200)
        await rig.raw.wait_drained(timeout=60)
        await wait_until(one_read_a_shard, timeout=10)
    assert 1200 == calls["echo"]
    assert 2 == most[0]
    assert most[1] <= 1


async def test_every_reader_returns_on_its_own_when_the_worker_stops(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shards, 300 requests drained from shard 0, then a stop: every reader of
    both shards, the helpers waiting for a backlog included, returns on its own, none
    cancelled by the feeders' deadline (which would cut off a read Redis answered)."""
    ended: list[str] = []
    read_loop = Worker._read_loop

    async def recording(self: Worker, store: Store, shard: int, *, helper: bool = False) -> None:
        try:
            await read_loop(self, store, shard, helper=helper)
        except anyio.get_cancelled_exc_class():
            ended.append("cancelled")
            raise
        ended.append("returned")

    monkeypatch.setattr(Worker, "_read_loop", recording)
    calls: Counter[str] = Counter()
    async with _serving(
        settings, keys, redis, calls, anyio.Event(), concurrency=8, prefetch=56, shards=2
    ) as rig:
        await _prefill(rig.raw, "echo", 300)
        await rig.raw.wait_drained(timeout=60)
    assert 300 == calls["echo"]
    assert ["returned"] * 4 == ended


async def test_a_reader_with_no_slot_free_waits_for_a_quarter_of_its_share(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrency 4, fixed prefetch 12 (16 slots, one shard): each time a reader
    finds every slot taken it asks to wait for a quarter of its share: 2 of 8 while
    the shard has a backlog (two readers, half each), 4 of 16 otherwise. Every one of
    300 requests is answered once."""
    asked: list[tuple[int, int, int]] = []  # (free when asked, most, refill)
    take = Slots.take

    async def recording(self: Slots, most: int, *, refill: int = 1, patience_s: float = 0) -> int:
        asked.append((self.free, most, refill))
        return await take(self, most, refill=refill, patience_s=patience_s)

    monkeypatch.setattr(Slots, "take", recording)
    raw = Raw(redis, settings.prefix, keys)
    await _prefill(raw, "echo", 300)
    calls: Counter[str] = Counter()
    async with _serving(
        settings, keys, redis, calls, anyio.Event(), concurrency=4, prefetch=12
    ) as rig:
        await rig.raw.wait_drained(timeout=60)
    assert 300 == calls["echo"]
    # A reader asks for its share (8 or 16); the reclaimer, for up to 256.
    starved = {(most, refill) for free, most, refill in asked if free == 0 and most <= 16}
    assert (8, 2) in starved, "no reader of the backlog ever found every slot taken"
    assert starved <= {(8, 2), (16, 4)}
