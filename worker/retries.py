"""Retry policies: how many attempts a handler gets, which failures earn another, and
how long to wait before it.

A policy is a frozen value (:class:`RetryPolicy`) set per handler
(``@app.handler("x", retries=3, backoff=Backoff(base_s=0.1, cap_s=5), retry_on=(...))``)
or as the :class:`~worker.handlers.App` default. ``BadPayload`` never retries; a
timeout retries while attempts remain; any other exception retries only when it is
an instance of ``retry_on`` (else the request is answered ``handler_error`` at once).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: What retries when ``retry_on`` is not given: any exception (as before policies).
RETRY_ANY: tuple[type[BaseException], ...] = (Exception,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Exponential backoff: ``min(cap_s, base_s * 2 ** (retry - 1))`` before retry
    ``retry`` (1 for the second attempt), drawn uniformly from its upper half when
    ``jitter`` (so retries of many requests failing together spread out, and none
    comes back at once)."""

    base_s: float = 0.1
    cap_s: float = 5.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if not (self.base_s >= 0 and self.cap_s >= self.base_s and self.cap_s < 86_400):
            raise ValueError("Backoff needs 0 <= base_s <= cap_s < 86400")

    def delay_s(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        delay = self._top(retry)
        if self.jitter and delay > 0:
            return (rng or _rng).uniform(delay / 2, delay)
        return delay

    def most_s(self, retries: int) -> float:
        """The longest all ``retries`` waits can take together (for time budgets)."""
        return sum(self._top(n) for n in range(1, retries + 1))

    def _top(self, retry: int) -> float:
        return min(self.cap_s, self.base_s * 2.0 ** min(retry - 1, 60))


#: No wait between attempts (the default, and the behaviour before policies).
NO_BACKOFF = Backoff(base_s=0.0, cap_s=0.0, jitter=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """``retries`` more attempts after the first, ``backoff`` between them, for the
    exceptions in ``retry_on`` (timeouts always count)."""

    retries: int = 0
    backoff: Backoff = NO_BACKOFF
    retry_on: tuple[type[BaseException], ...] = RETRY_ANY

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= 100:
            raise ValueError("retries must be 0..100")
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on):
            raise ValueError("retry_on must be a tuple of exception classes")

    def retries_on(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by an attempt) earns another attempt."""
        return isinstance(exc, self.retry_on)

    def budget_s(self, timeout_s: float) -> float:
        """The longest every attempt and every wait can take together."""
        return timeout_s * (self.retries + 1) + self.backoff.most_s(self.retries)


_rng = random.Random()  # noqa: S311 - jitter, not a secret
