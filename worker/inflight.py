"""What travels through the batch path, and what it reports to.

::

    Delivery (an entry read from a shard) -> Job (authenticated and claimed: for a
      handler) -> PendingWrite (for the writer) -> Tracker.done / done_many

Shared by the stages of the path (:mod:`worker.intake`, :mod:`worker.handling`,
:mod:`worker.handshake_lane`, :mod:`worker.writer`), with the worker's counters
(:class:`Stats`) and the helpers that put a request's ids on a refusal. No I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker import wire
from worker.dispatch import Outcome, Work
from worker.errors import ProtocolError
from worker.protocol import now_ms
from worker.streams import Entry, Write

Clock = Callable[[], int]
#: The event loop runs other tasks at least this often while a batch is decoded,
#: and while the handler pool takes queued jobs (s).
YIELD_S = 0.005


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return now_ms()


@dataclass(slots=True, kw_only=True)  # not frozen: built per message, 3x cheaper; never mutated
class Delivery:
    """An entry handed to the processor, with its shard and delivery count."""

    shard: int
    entry: Entry
    attempts: int
    #: set once the entry is queued on (to the pool, the lane or the writer): from
    #: then on it ends in ``tracker.done`` there
    handed: bool = False

    #: ``owner``, once built (it is read several times per message)
    _owner: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def owner(self) -> str:
        """The replay record's value for this entry: ``<shard>|<entry id>``."""
        owner = self._owner
        if owner is None:
            owner = self._owner = f"{self.shard}|{self.entry.id}"
        return owner


class Tracker(Protocol):
    """The runtime's bookkeeping of entries in flight (slots and heartbeats)."""

    def parked(self, d: Delivery) -> None:
        """``d`` waits in the handshake lane: its processing slot is free again."""

    def writing(self, ds: Sequence[Delivery]) -> None:
        """``ds`` are in a writer's script call: their processing slots are free again."""

    def handlers_idle(self) -> None:
        """The handlers had nothing to do (a batch ran inline, or a pool task waits)."""

    def handlers_busy(self) -> None:
        """A job waited for a handler (no token free, or queued in the pool)."""

    def done(self, d: Delivery) -> None:
        """``d`` is finished (acknowledged, or left pending to be reclaimed)."""

    def done_many(self, ds: Sequence[Delivery]) -> None:
        """Each of ``ds`` is finished (the writer's flush, in one call)."""

    def in_flight(self) -> int:
        """Entries read and not finished yet."""


@dataclass(slots=True, kw_only=True)  # not frozen: built per message, 3x cheaper; never mutated
class Job:
    """An authenticated request whose replay record is this entry's: run its handler.

    ``work`` is its decoded payload and attempt count once prepared (a job handed on
    after a timeout keeps it, for its next attempt).
    """

    delivery: Delivery
    request: wire.Request
    plaintext: bytes = field(repr=False)
    reply_key: bytes = field(repr=False)
    seen_ttl_ms: int
    work: Work | None = None
    #: The attempt to start at (a redelivery of a request that was being retried).
    first_attempt: int = 1
    #: ``time.monotonic()`` before its replay record was set.
    claimed_at: float = 0.0
    #: Its OpenTelemetry span, when tracing is on.
    span: Any = None


@dataclass(slots=True, kw_only=True)  # not frozen: built per message, 3x cheaper; never mutated
class PendingWrite:
    """A write for the writer, with what it finishes (for logs and metrics)."""

    delivery: Delivery
    write: Write
    request: wire.Request | None = None
    outcome: Outcome | None = None
    refusal: ProtocolError | None = None


class Stats:
    """Counters for one worker process."""

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.refused = 0
        self.redelivered_done = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        return {
            "ok": self.ok,
            "error": self.error,
            "refused": self.refused,
            "redelivered_done": self.redelivered_done,
        }


def fill_context(exc: ProtocolError, request: wire.Request) -> ProtocolError:
    """``exc`` with the request's ids, field, alg and type where it has none."""
    exc.session_id = exc.session_id or request.sid
    exc.message_id = exc.message_id or request.mid
    exc.field = exc.field or request.field
    exc.alg = exc.alg or request.alg
    exc.type = exc.type or request.type
    return exc


def with_context(new: ProtocolError, old: ProtocolError) -> ProtocolError:
    """``new`` with ``old``'s context (ids, field, alg, type, whether to keep the entry)."""
    new.session_id, new.message_id, new.field = old.session_id, old.message_id, old.field
    new.alg, new.type, new.keep_original = old.alg, old.type, old.keep_original
    return new
