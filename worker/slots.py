"""Processing slots: how many more entries a worker may take in flight.

A counter with one wake-up event, taken and given back in bulk: the reader takes
as many as are free at once (a batch) and the writer gives a flush's worth back in
one call. (An ``anyio.Semaphore`` costs two calls per entry, a share of the hot
path, measured.)
"""

from __future__ import annotations

import anyio
import anyio.lowlevel


class Slots:
    """``limit`` slots; :meth:`take` waits for at least one."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("there must be at least one slot")
        self.limit = limit
        self.free = limit
        self._freed = anyio.Event()

    async def take(self, most: int) -> int:
        """Wait until a slot is free, then take up to ``most`` of the free ones."""
        await anyio.lowlevel.checkpoint()
        while self.free == 0:
            if self._freed.is_set():
                self._freed = anyio.Event()
            await self._freed.wait()
        taken = min(self.free, max(1, most))
        self.free -= taken
        return taken

    def give(self, n: int = 1) -> None:
        """Give ``n`` taken slots back (never past the limit)."""
        if n <= 0:
            return
        self.free = min(self.limit, self.free + n)
        if not self._freed.is_set():
            self._freed.set()
