"""The handshake lane's threads run at the lowest CPU priority, and only they do."""

from __future__ import annotations

import os
import sys
import threading

import anyio
import pytest

from worker import keypool
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
