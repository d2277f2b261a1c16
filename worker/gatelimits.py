"""The gateway's admission limits and metrics: per-client token buckets, open
event-stream slots, Prometheus counters. Pure bookkeeping, no I/O.

Clients are told apart by their address as the gateway sees it (behind a
reverse proxy, that proxy's limits apply instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

# Buckets of clients idle this long are full again and are dropped.
_IDLE_S = 120.0
_PRUNE_AT = 10_000


@dataclass(slots=True)
class RateLimiter:
    """A token bucket per client: ``rate`` per second, up to ``burst``."""

    rate: float
    burst: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def take(self, client: str, now: float) -> float:
        """Take one token; 0.0 when allowed, else the seconds until one is free."""
        tokens, last = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > _PRUNE_AT:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        for key, (_, last) in list(self._buckets.items()):
            if now - last > _IDLE_S:
                del self._buckets[key]


@dataclass(slots=True)
class StreamSlots:
    """Open event streams, counted in all and per client."""

    total: int
    per_client: int
    _open: dict[str, int] = field(default_factory=dict)
    _count: int = 0

    def acquire(self, client: str) -> str | None:
        """Take a slot; None when taken, else why not (``all`` or ``client``)."""
        if self._count >= self.total:
            return "all"
        if self._open.get(client, 0) >= self.per_client:
            return "client"
        self._open[client] = self._open.get(client, 0) + 1
        self._count += 1
        return None

    def release(self, client: str) -> None:
        """Give a slot back."""
        left = self._open.get(client, 0) - 1
        if left > 0:
            self._open[client] = left
        else:
            self._open.pop(client, None)
        self._count -= 1

    @property
    def count(self) -> int:
        """Streams open now."""
        return self._count


class GatewayMetrics:
    """The gateway's metrics, in their own registry (labels never from input)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sealstream_gateway_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=r,
        )
        self.refused = Counter(
            "sealstream_gateway_refused",
            "Requests refused, by reason (malformed, unsupported, too_large, media_type,"
            " rate_limited, streams_exhausted, bad_id, no_config, redis_unavailable).",
            ["reason"],
            registry=r,
        )
        self.forwarded_bytes = Counter(
            "sealstream_gateway_forwarded_bytes",
            "Envelope bytes added to request shards.",
            registry=r,
        )
        self.events = Counter(
            "sealstream_gateway_events", "Reply entries sent as server-sent events.", registry=r
        )
        self.open_streams = Gauge(
            "sealstream_gateway_open_streams", "Event streams open now.", registry=r
        )
