"""Processing slots: how many more entries a worker may take in flight.

A counter with one wake-up event, taken and given back in bulk: the reader takes
as many as are free at once (a batch) and the writer gives a flush's worth back in
one call. (An ``anyio.Semaphore`` costs two calls per entry, a share of the hot
path, measured.) A reader that found none free waits a little (``patience_s``) for
some to be (``refill``) once the first is given back: a saturated worker then reads
in batches, not in dribbles of a few entries that each pay for a read and a batch's
round trips.

The limit may move (:meth:`Slots.resize`): the runtime deepens the read-ahead while
handlers keep up and takes it back when entries wait for one. Slots taken above a
lowered limit stay taken until given back; no new ones are handed out meanwhile.
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
        self.taken = 0
        self._freed = anyio.Event()

    @property
    def free(self) -> int:
        """Slots that may be taken now."""
        return max(0, self.limit - self.taken)

    async def take(self, most: int, *, refill: int = 1, patience_s: float = 0.0) -> int:
        """Take up to ``most`` of the free slots (at least one).

        With none free, wait for one; then, for at most ``patience_s`` more, for
        ``refill`` (at most ``most``, at most the limit as it is then). The patience
        bounds the wait: slots held elsewhere (other readers' shares, a lowered
        limit) may never let ``refill`` come free.
        """
        await anyio.lowlevel.checkpoint()
        if self.taken >= self.limit:
            give_up_at: float | None = None
            while True:
                free = self.limit - self.taken
                if free >= max(1, min(refill, most, self.limit)):
                    break
                if free < 1:
                    await self._given()
                    continue
                now = anyio.current_time()
                if give_up_at is None:
                    give_up_at = now + patience_s
                if now >= give_up_at:
                    break
                with anyio.move_on_after(give_up_at - now):
                    await self._given()
        taken = min(self.limit - self.taken, max(1, most))
        self.taken += taken
        return taken

    async def _given(self) -> None:
        """Wait for the next give (or raise of the limit)."""
        if self._freed.is_set():
            self._freed = anyio.Event()
        await self._freed.wait()

    def give(self, n: int = 1) -> None:
        """Give ``n`` taken slots back (never more than were taken)."""
        if n <= 0:
            return
        self.taken = max(0, self.taken - n)
        if not self._freed.is_set():
            self._freed.set()

    def resize(self, limit: int) -> None:
        """Move the limit to ``limit`` (at least one); a waiting take sees a raise."""
        if limit < 1:
            raise ValueError("there must be at least one slot")
        grew = limit > self.limit
        self.limit = limit
        if grew and not self._freed.is_set():
            self._freed.set()
