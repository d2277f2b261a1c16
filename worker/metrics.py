"""Prometheus metrics of one worker process, served when ``SEALSTREAM_METRICS_PORT`` is set.

Labels never take values from unauthenticated input: ``type`` is a registered
handler's name (or ``sealstream.handshake``), anything else counts as ``unknown``;
``reason`` is one of the protocol's dead-letter reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from worker.errors import ConfigError


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
            "sealstream_in_flight", "Entries this worker is processing now.", registry=r
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
        self.redis_outages = Counter(
            "sealstream_redis_outages", "Redis outages ridden out.", registry=r
        )


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """The HTTP server exposing ``/metrics``; stop it with :meth:`close`."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.server.server_address[1])

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(metrics: Metrics, *, port: int, addr: str) -> MetricsServer:
    """Serve ``metrics`` over HTTP; ConfigError naming the setting if it cannot listen."""
    try:
        server, thread = start_http_server(port, addr=addr, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(
            f"SEALSTREAM_METRICS_PORT: cannot listen on {addr}:{port}: {exc.strerror}"
        ) from None
    return MetricsServer(server=server, thread=thread)
