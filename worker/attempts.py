"""The attempt a retried request is on, kept in Redis so a crash does not reset it.

``P:{sid}:attempt:<mid>`` (same slot as the replay record) is written only when a
retry is scheduled, and lives no longer than the replay record. A redelivery of the
entry (after a crash and a reclaim) reads it and goes on from that attempt: the one
the crash interrupted runs again (the crash was the worker's, not the handler's; a
handler that crashes its worker every time is stopped by the delivery limit).
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.retries import RetryPolicy
from worker.streams import Retrier, Store


class AttemptLog:
    """Reads and writes attempt records through the worker's outage retrier."""

    def __init__(self, store: Store, retry: Retrier) -> None:
        self._store = store
        self._retry = retry

    async def save(self, sid: str, mid: str, attempt: int, *, ttl_ms: int) -> None:
        """Record that ``mid`` is on ``attempt`` for at most ``ttl_ms``."""
        key = self._store.names.attempt(sid, mid)
        await self._retry(lambda: self._store.redis.set(key, attempt, px=max(1, ttl_ms)))

    async def load(self, ids: Sequence[tuple[str, str]]) -> list[int]:
        """The recorded attempt of each ``(sid, mid)``, 1 where there is none (or a
        value that is not a small positive integer: the record is not trusted)."""
        out = []
        for sid, mid in ids:  # only redeliveries ask: rare, one GET each (slots differ)
            key = self._store.names.attempt(sid, mid)
            raw = await self._retry(lambda key=key: self._store.redis.get(key))  # type: ignore[misc]
            out.append(_parse(raw))
        return out


def start_attempt(recorded: int, policy: RetryPolicy) -> int:
    """The attempt a redelivery starts at: the recorded one, within the policy."""
    return max(1, min(recorded, policy.retries + 1))


def _parse(raw: bytes | None) -> int:
    if raw is None or not raw.isdigit() or len(raw) > 3:
        return 1
    return max(1, int(raw))
