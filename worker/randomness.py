"""Fresh random bytes for the hot path: AES-GCM ivs and RSA-unwrap substitutes.

``os.urandom`` is a system call, and CPython lets go of the GIL around it. With RSA
unwraps running in threads, every reply's iv handed the event loop's GIL to an
unwrap thread, and the loop then waited to get it back (measured: an RSA drain is
6-13% faster without). So the bytes are drawn from the OS in blocks and handed out in
pieces:

- each piece is handed out once: ``deque.popleft`` is atomic, and threads share a pool;
- a forked child starts with empty pools (``os.register_at_fork``), so a parent and
  its child never hand out the same bytes;
- the pieces are the OS's CSPRNG output, unchanged.
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

    def take(self) -> bytes:
        """``size`` fresh random bytes, never handed out before."""
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

    def clear(self) -> None:
        """Forget the pieces drawn and not handed out."""
        self._pieces.clear()


_ivs = Pool(IV_SIZE)
_keys = Pool(KEY_SIZE)


def fresh_iv() -> bytes:
    """A fresh random 12-byte AES-GCM iv."""
    return _ivs.take()


def fresh_key() -> bytes:
    """A fresh random 32-byte key."""
    return _keys.take()


def _forget() -> None:
    _ivs.clear()
    _keys.clear()


os.register_at_fork(after_in_child=_forget)
