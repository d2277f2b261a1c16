"""Fresh random bytes drawn in blocks: each piece handed out once, in any thread, and
never by both a parent and its forked child."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from worker import crypto, randomness
from worker.randomness import BLOCK, Pool


def test_pieces_have_the_size_asked_for_and_never_repeat() -> None:
    """Ten blocks' worth of 12-byte pieces: each 12 bytes, no two alike."""
    pool = Pool(12)
    pieces = [pool.take() for _ in range(10 * BLOCK)]
    assert {12} == {len(p) for p in pieces}
    assert len(pieces) == len(set(pieces))


def test_a_block_is_drawn_only_when_the_last_is_used_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``os.urandom`` call per ``BLOCK`` pieces, and its bytes are the pieces, in order."""
    draws: list[bytes] = []
    real = os.urandom

    def urandom(n: int) -> bytes:
        draws.append(real(n))
        return draws[-1]

    monkeypatch.setattr(os, "urandom", urandom)
    pool = Pool(32)
    pieces = [pool.take() for _ in range(BLOCK + 1)]
    assert 2 == len(draws)
    assert b"".join(pieces[:BLOCK]) == draws[0]
    assert pieces[BLOCK] == draws[1][:32]
    assert BLOCK - 1 == len(pool)


def test_threads_taking_at_once_never_get_the_same_piece() -> None:
    """Four threads take 3,000 pieces each from one pool, the GIL switching between
    them every microsecond: 12,000 distinct pieces."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    pool = Pool(12)
    got: list[list[bytes]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def taker(mine: list[bytes]) -> None:
        start.wait()
        for _ in range(3000):
            mine.append(pool.take())

    threads = [threading.Thread(target=taker, args=(g,)) for g in got]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(before)
    everything = [p for g in got for p in g]
    assert 12_000 == len(everything) == len(set(everything))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_hands_out_the_parents_pieces() -> None:
    """After a fork the child draws its own: none of the 50 ivs it takes is among the
    pieces the parent had drawn and not yet handed out."""
    randomness.fresh_iv()  # the parent now holds drawn pieces not handed out
    held = set(randomness._ivs._pieces)
    assert held
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next 50 ivs
        try:
            os.write(write, b"".join(randomness.fresh_iv() for _ in range(50)))
        finally:
            os._exit(0)
    os.close(write)
    report = b""
    while chunk := os.read(read, 4096):
        report += chunk
    os.close(read)
    os.waitpid(pid, 0)
    child = {report[i : i + 12] for i in range(0, len(report), 12)}
    assert 50 == len(child)
    assert not child & held


def test_a_pool_drawn_by_another_process_is_dropped() -> None:
    """A pool whose pieces were drawn under another pid (a fork made by C code, which
    no Python hook sees) drops them and draws anew."""
    pool = Pool(12)
    first = pool.take()
    held = set(pool._pieces)
    pool._pid = -1  # as if this process were a child of the one that drew them
    assert not {pool.take() for _ in range(BLOCK)} & (held | {first})


def test_seal_takes_a_fresh_iv_for_every_box() -> None:
    """2,000 boxes sealed under one key carry 2,000 different ivs."""
    key = bytes(32)
    ivs = {crypto.seal(key, b"x", b"aad").iv for _ in range(2000)}
    assert 2000 == len(ivs)


def test_a_piece_is_at_least_one_byte() -> None:
    """A pool of empty pieces is refused."""
    with pytest.raises(ValueError, match="at least one byte"):
        Pool(0)
