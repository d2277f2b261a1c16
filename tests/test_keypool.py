"""The handshake lane's threads run at the lowest CPU priority, and only they do."""

from __future__ import annotations

import os
import sys
import threading

import pytest

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


async def test_only_the_lanes_threads_are_lowered() -> None:
    """The thread that made the pool (the event loop's) keeps its own priority."""
    before = _priority()
    await _lane_priority("idle")
    assert before == _priority()
