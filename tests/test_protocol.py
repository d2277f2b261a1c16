"""The protocol's constants and its id and clock helpers (worker.protocol)."""

from __future__ import annotations

import time

from worker import wire
from worker.protocol import ALG_RSA, ALG_SK, ALGORITHMS, new_id, now_ms


def test_new_id_is_a_well_formed_id() -> None:
    """new_id gives 32 lowercase hex characters, a fresh value each call."""
    first, second = new_id(), new_id()
    assert wire.is_id(first) and wire.is_id(second)
    assert first != second


def test_now_ms_is_the_epoch_in_milliseconds() -> None:
    """now_ms is the wall clock in whole milliseconds."""
    before = time.time_ns() // 1_000_000
    now = now_ms()
    assert before <= now <= time.time_ns() // 1_000_000


def test_algorithms_are_the_two_modes() -> None:
    """ALGORITHMS holds exactly the RSA and session-key modes."""
    assert frozenset({ALG_RSA, ALG_SK}) == ALGORITHMS
