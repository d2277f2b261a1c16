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
