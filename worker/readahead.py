"""Read-ahead: how many entries a worker holds before and in its handlers.

A fixed ``SEALSTREAM_PREFETCH`` keeps ``concurrency + prefetch`` slots. Left unset,
the read-ahead adapts, so fast handlers get a pipeline deep enough to keep the
event loop busy while batches wait on Redis, and slow handlers never hoard entries
other workers could take:

- it starts at ``concurrency`` (the fixed default);
- it doubles, up to ``DEEPEST``, when the handlers had nothing to do while the
  reader waited for a free slot (the read-ahead, not the handlers, held the pace);
- it falls back to the start as soon as an entry waits for a handler, and halves at
  each read once the reader has not waited for a slot for ``IDLE_S`` (a deep
  read-ahead left from a burst would let the next read take more than it needs);
- it never holds more than ``BUDGET_BYTES`` of entries read ahead, by a moving mean
  of the entry size (over about the last four reads), nor less than the start; a
  read that moves that limit below the depth lowers the depth at once.

Entries past their handler (in a writer's script call) hold no slot (see
``Worker.writing``): the writers' two calls bound them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from worker.slots import Slots

#: the deepest adaptive read-ahead (entries beyond ``concurrency``)
DEEPEST = 512
#: the most bytes of entries an adaptive read-ahead holds
BUDGET_BYTES = 32 * 1024 * 1024
#: seconds without the reader waiting for a slot after which the depth decays
IDLE_S = 1.0


class ReadAhead:
    """Moves ``slots.limit`` between ``concurrency + start`` and its ceiling."""

    def __init__(
        self,
        slots: Slots,
        *,
        concurrency: int,
        start: int,
        adaptive: bool,
        on_change: Callable[[int], None] = lambda depth: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = slots
        self.clock = clock
        self.on_change = on_change
        self.concurrency = concurrency
        self.start = start
        self.adaptive = adaptive
        self.depth = start
        self._starved = False
        self._starved_at = 0.0
        #: moving mean of the entry size (bytes), 0 before the first read
        self._mean = 0.0

    def read(self, entries: int, nbytes: int) -> None:
        """The reader read ``entries`` entries of ``nbytes`` bytes in all."""
        if entries <= 0:
            return
        mean = nbytes / entries
        self._mean = mean if not self._mean else self._mean + (mean - self._mean) / 4
        if self.adaptive and self.depth > self.start:
            depth = min(self.depth, self.ceiling())
            if self.clock() - self._starved_at > IDLE_S:
                depth = max(self.start, depth // 2)
            if depth != self.depth:
                self._set(depth)

    def starved(self) -> None:
        """The reader found no free slot."""
        self._starved = True
        self._starved_at = self.clock()

    def handlers_idle(self) -> None:
        """The handlers had nothing to do: deepen if the reader was starved meanwhile."""
        if not self.adaptive or not self._starved:
            return
        self._starved = False
        depth = min(self.ceiling(), self.depth * 2)
        if depth > self.depth:
            self._set(depth)

    def handlers_busy(self) -> None:
        """An entry waited for a handler: back to the start."""
        self._starved = False
        if self.depth != self.start:
            self._set(self.start)

    def ceiling(self) -> int:
        """The deepest read-ahead allowed by ``DEEPEST`` and the byte budget."""
        by_bytes = int(BUDGET_BYTES / self._mean) if self._mean else DEEPEST
        return max(self.start, min(DEEPEST, by_bytes))

    def _set(self, depth: int) -> None:
        self.depth = depth
        self.slots.resize(self.concurrency + depth)
        self.on_change(depth)
