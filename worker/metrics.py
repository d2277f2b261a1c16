"""Prometheus metrics of one worker process, served when ``SEALSTREAM_METRICS_PORT`` is set.

Under ``sealstream worker --processes N`` the supervisor serves one endpoint for all
its children (prometheus-client's multiprocess mode): gauges say how to combine
processes (``livesum``, ``liveall``), and a dead child's live gauges are dropped.

Labels never take values from unauthenticated input: ``type`` is a registered
handler's name (or ``sealstream.handshake``), anything else counts as ``unknown``;
``reason`` is one of the protocol's dead-letter reasons.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.health import HttpServer
from worker.health import serve as serve_http


class Metrics:
    """The worker's counters, histograms and gauges, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sealstream_requests",
            "Requests answered, by handler type and reply status (ok or error).",
            ["type", "status"],
            registry=r,
        )
        self.refused = Counter(
            "sealstream_refused",
            "Entries refused (notice and/or dead letter), by dead-letter reason.",
            ["reason"],
            registry=r,
        )
        self.handler_seconds = Histogram(
            "sealstream_handler_seconds",
            "Time handlers ran, per attempt, by handler type.",
            ["type"],
            registry=r,
        )
        self.in_flight = Gauge(
            "sealstream_in_flight",
            "Entries this worker is processing now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.read_ahead = Gauge(
            "sealstream_read_ahead",
            "Entries this worker may hold beyond its running handlers now (adaptive"
            " unless SEALSTREAM_PREFETCH is set).",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.last_read = Gauge(
            "sealstream_last_read_timestamp_seconds",
            "When a read from a request shard last completed (Unix time; updated at most"
            " once a second). /readyz is built on it.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.handshake_keys_ready = Gauge(
            "sealstream_handshake_keys_ready",
            "Session key pairs made ahead and ready for handshakes (SEALSTREAM_HANDSHAKE_POOL).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.unwrap_processes = Gauge(
            "sealstream_unwrap_processes",
            "Child processes doing RSA unwraps (SEALSTREAM_UNWRAP_PROCESSES), running now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.reclaimed = Counter(
            "sealstream_reclaimed",
            "Entries reclaimed from consumers idle past the claim timeout.",
            registry=r,
        )
        self.redelivered_done = Counter(
            "sealstream_redelivered_done",
            "Redeliveries of entries already answered (acknowledged, not run again).",
            registry=r,
        )
        self.handshakes = Counter(
            "sealstream_handshakes",
            "Handshakes by outcome: ok, bad_payload, or the refusal's dead-letter reason.",
            ["outcome"],
            registry=r,
        )
        self.retries = Counter(
            "sealstream_retries",
            "Handler attempts scheduled again after a failure or timeout, by handler type.",
            ["type"],
            registry=r,
        )
        self.redis_outages = Counter(
            "sealstream_redis_outages", "Redis outages ridden out.", registry=r
        )


def serve(
    metrics: Metrics,
    *,
    port: int,
    addr: str,
    ready: Callable[[], bool] | None = None,
) -> HttpServer:
    """Serve ``metrics`` at ``/metrics`` with ``/healthz`` and ``/readyz`` (``ready``,
    default: always); ConfigError naming the setting if it cannot listen."""
    return serve_http(metrics.registry, port=port, addr=addr, ready=ready or (lambda: True))
