"""Riding out Redis outages: :class:`Retrier` and what counts as "for now".

A server that is down, loading, out of memory, read-only (a demoted primary), or a
cluster that is down, failing over or moving slots, refuses for now: the operation
is run again after a capped, jittered backoff. Any other error is permanent.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.logging import get_logger

T = TypeVar("T")
log = get_logger("sealstream.redis")

#: The cluster client's own errors; only some mean "for now" (see _cluster_transient).
_CLUSTER = (ClusterError, RedisClusterException)


class Retrier:
    """Runs one Redis operation until it succeeds, riding out outages.

    Capped, jittered exponential backoff; logs ``redis_unavailable`` once when an
    outage starts and ``redis_reconnected`` once when it ends. A failure within
    ``flap_s`` of a reconnect (a command that was already on a dead connection)
    belongs to the same outage and is not logged again. Only idempotent or
    retry-safe operations are passed here (see :meth:`Store.mark_seen` and the
    reply script); cancellation ends the wait.
    """

    def __init__(
        self,
        *,
        cap_s: float = 2.0,
        flap_s: float = 5.0,
        on_outage: Callable[[], object] | None = None,
    ) -> None:
        self.cap_s = cap_s
        self._on_outage = on_outage
        self.flap_s = flap_s
        self.in_outage = False
        self.outages = 0
        self._announced = False
        self._recovered_at = -flap_s

    async def __call__(self, op: Callable[[], Awaitable[T]]) -> T:
        delay = 0.05
        while True:
            try:
                result = await op()
            except (
                RedisConnectionError,
                RedisTimeoutError,
                OSError,
                ResponseError,
                *_CLUSTER,
            ) as exc:
                if not for_now(exc):
                    raise
                if not self.in_outage:
                    self.in_outage = True
                    if anyio.current_time() - self._recovered_at > self.flap_s:
                        self._announced = True
                        self.outages += 1
                        if self._on_outage is not None:
                            self._on_outage()
                        log.warning("redis_unavailable", error_type=type(exc).__name__)
                await anyio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter
                delay = min(delay * 2, self.cap_s)
                continue
            if self.in_outage:
                self.in_outage = False
                if self._announced:
                    self._announced = False
                    self._recovered_at = anyio.current_time()
                    log.info("redis_reconnected")
            return result


#: Errors a server gives while it cannot take writes *for now*: waited out like an
#: outage. redis-py raises them as these classes (it strips the code from their text);
#: MOVED/ASK are followed by the cluster client, and one that still escapes means the
#: slots are moving: for now, too.
_TRANSIENT_TYPES = (
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    MasterDownError,
    AskError,
)
#: The codes, as an aborted script's error keeps them in its text.
_TRANSIENT_CODES = ("OOM", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "BUSY")


def transient(exc: ResponseError) -> bool:
    """Whether Redis refused for now (out of memory, loading, a replica, failing over).

    Any other error (WRONGTYPE, say) is permanent: retrying cannot help, and the
    worker dead-letters what it was writing instead.
    """
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    text = str(exc)
    # "user_script:12: OOM command not allowed ..." from a script that aborted
    head = text.split(": ", 1)[1] if text.startswith("user_script:") and ": " in text else text
    return head.startswith(_TRANSIENT_CODES)


def for_now(exc: BaseException) -> bool:
    """Whether :class:`Retrier` waits ``exc`` out rather than raising it: Redis down or
    refusing for now (see :func:`transient`), or the cluster client giving up for now
    (a slot not covered, its redirections exhausted while a slot moves)."""
    if isinstance(exc, ResponseError):
        return transient(exc)
    if isinstance(exc, RedisClusterException):
        return _cluster_transient(exc)
    return isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | ClusterError)


def _cluster_transient(exc: RedisClusterException) -> bool:
    """Whether the cluster client gave up for now: a slot not covered while a
    failover runs, or no node reachable. Its other errors are bugs (a command it
    cannot route): never retried, or they would spin silently."""
    return isinstance(exc, SlotNotCoveredError) or "cannot be connected" in str(exc)
