"""Processing slots: taken in bulk, given back in bulk, waited for when none is free."""

from __future__ import annotations

import anyio
import pytest

from worker.slots import Slots

pytestmark = pytest.mark.anyio


async def test_take_takes_what_is_free_up_to_most() -> None:
    """A take gets as many as are free, at most ``most``, at least one."""
    slots = Slots(5)
    assert 3 == await slots.take(3)
    assert 2 == await slots.take(10)
    assert 0 == slots.free


async def test_take_waits_until_one_is_given_back() -> None:
    """With none free a take waits; a give wakes it with what was given."""
    slots = Slots(2)
    assert 2 == await slots.take(2)
    got: list[int] = []
    started = anyio.Event()

    async def taker() -> None:
        started.set()
        got.append(await slots.take(10))

    async with anyio.create_task_group() as tg:
        tg.start_soon(taker)
        await started.wait()
        await anyio.wait_all_tasks_blocked()
        assert [] == got
        slots.give(2)
    assert [2] == got


async def test_two_waiting_takers_share_what_is_given() -> None:
    """Two takers waiting: each gets a slot when two are given back one by one."""
    slots = Slots(2)
    await slots.take(2)
    got: list[int] = []

    async def taker() -> None:
        got.append(await slots.take(1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(taker)
        tg.start_soon(taker)
        await anyio.wait_all_tasks_blocked()
        slots.give()
        await anyio.wait_all_tasks_blocked()
        slots.give()
    assert [1, 1] == got


def test_free_slots_never_exceed_the_limit() -> None:
    """Giving back more than was taken leaves the count at the limit."""
    slots = Slots(1)
    slots.give(3)
    assert 1 == slots.free


def test_there_is_at_least_one_slot() -> None:
    """A limit under one is refused."""
    with pytest.raises(ValueError):
        Slots(0)


async def test_a_take_with_none_free_waits_for_its_refill() -> None:
    """With none free, a take asking for a refill of 3 (and patient enough) does not
    wake for 1 or 2 given back, only once 3 are free, and then takes them."""
    slots = Slots(4)
    assert 4 == await slots.take(4)
    got: list[int] = []

    async def taker() -> None:
        got.append(await slots.take(4, refill=3, patience_s=60))

    async with anyio.create_task_group() as tg:
        tg.start_soon(taker)
        await anyio.wait_all_tasks_blocked()
        slots.give()
        await anyio.wait_all_tasks_blocked()
        slots.give()
        await anyio.wait_all_tasks_blocked()
        assert [] == got
        slots.give()
    assert [3] == got


async def test_a_take_with_some_free_does_not_wait_for_its_refill() -> None:
    """A refill applies only when none is free: with one free, a take gets it at once."""
    slots = Slots(4)
    await slots.take(3)
    with anyio.fail_after(1):
        assert 1 == await slots.take(4, refill=3, patience_s=60)


async def test_a_refill_never_asks_for_more_than_most_or_the_limit() -> None:
    """A refill above ``most`` waits for ``most``; one above a limit lowered while waiting
    waits for the new limit, not forever."""
    slots = Slots(4)
    await slots.take(4)
    got: list[int] = []

    async def taker(most: int) -> None:
        got.append(await slots.take(most, refill=10, patience_s=60))

    async with anyio.create_task_group() as tg:
        tg.start_soon(taker, 2)
        await anyio.wait_all_tasks_blocked()
        slots.give(2)
    assert [2] == got
    slots.give(2)  # all four free again: take them, then lower the limit to 2
    await slots.take(4)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(taker, 4)
            await anyio.wait_all_tasks_blocked()
            slots.resize(2)
            slots.give(4)
    assert [2, 2] == got


async def test_a_refill_held_elsewhere_is_waited_for_only_as_long_as_the_patience() -> None:
    """Slots held by others may never let the refill come free: once one is free, the
    take waits at most its patience (50 ms), then takes what is free."""
    slots = Slots(8)
    await slots.take(8)
    got: list[int] = []

    async def taker() -> None:
        got.append(await slots.take(8, refill=6, patience_s=0.05))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(taker)
            await anyio.wait_all_tasks_blocked()
            assert [] == got
            slots.give(2)  # the other six stay taken
    assert [2] == got


async def test_a_take_whose_free_slots_were_taken_meanwhile_waits_again() -> None:
    """Free slots another take grabs during the patience are not counted: the waiting
    take ends with at least one slot, never zero or less."""
    slots = Slots(4)
    await slots.take(4)
    got: list[int] = []

    async def patient() -> None:
        got.append(await slots.take(4, refill=4, patience_s=0.05))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(patient)
            await anyio.wait_all_tasks_blocked()
            slots.give(1)
            assert 1 == await slots.take(1)  # grabbed before the patient take's turn
            await anyio.sleep(0.1)  # its patience runs out with none free
            assert [] == got
            slots.give(1)
    assert [1] == got
    assert 4 == slots.taken
