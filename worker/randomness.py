"""Fresh random bytes for the hot path: AES-GCM ivs and RSA-unwrap substitutes.

``os.urandom`` is a system call, and CPython lets go of the GIL around it. With RSA
unwraps running in threads, every reply's iv handed the event loop's GIL to an
unwrap thread, and the loop then waited to get it back (measured: an RSA drain is
6-13% faster without). So the bytes are drawn from the OS in blocks and handed out in
pieces:

- each piece is handed out once: ``deque.popleft`` is atomic, and threads share a pool;
- a pool drawn in another process is dropped: the pool notes the pid that drew it, so
  a parent and its forked child (by ``os.fork`` or by C code) never hand out the
  same bytes;
- the pieces are the OS's CSPRNG output, unchanged.

A snapshot of a running process restored twice (a VM or CRIU clone) would hand out
the same pieces in both until their blocks run out, as would any random state held
in memory; plain ``os.urandom`` would not. Keys never come from here: only ivs
(unique, not secret) and the throwaway key an RSA unwrap failure opens with.
"""

from __future__ import annotations

import os
from collections import deque

from worker.protocol import IV_SIZE, KEY_SIZE

#: pieces drawn from the OS at once
BLOCK = 256


class Pool:
    """Random pieces of ``size`` bytes, drawn ``BLOCK`` at a time."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a piece is at least one byte")
        self.size = size
        self._pieces: deque[bytes] = deque()
        self._pid = os.getpid()

    def take(self) -> bytes:
        """``size`` fresh random bytes, never handed out before."""
        if self._pid != os.getpid():  # drawn by the process this one was forked from
            self._pieces.clear()
            self._pid = os.getpid()
        try:
            return self._pieces.popleft()
        except IndexError:
            pass
        n = self.size
        raw = os.urandom(n * BLOCK)
        pieces = [raw[i : i + n] for i in range(0, len(raw), n)]
        self._pieces.extend(pieces[1:])
        return pieces[0]

    def __len__(self) -> int:
        return len(self._pieces)


_ivs = Pool(IV_SIZE)
_keys = Pool(KEY_SIZE)


def fresh_iv() -> bytes:
    """A fresh random 12-byte AES-GCM iv."""
    return _ivs.take()


def fresh_key() -> bytes:
    """Fresh random 32 bytes for a throwaway key (a failed RSA unwrap's substitute),
    never for a key that protects anything."""
    return _keys.take()
