"""Health endpoints beside ``/metrics``: ``/healthz`` (alive) and ``/readyz`` (consuming).

A worker is ready when it is not stopping and one of its reads from a request shard
completed within the last ``window_s`` seconds (a read blocks at most 0.5 s, so an
idle worker completes several a second). Such a read proves the connection to Redis
and the consumer group both work. A worker whose every slot is busy for longer than
the window does not read, so it reports not ready: it is taking no new work, which
is what ready means for a consumer.

:class:`Readiness` is the hook the worker runtime calls; :func:`serve` runs the HTTP
server (a daemon thread, as prometheus-client's own).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from worker.errors import ConfigError

#: Seconds since the last completed read within which a worker is ready.
READY_WINDOW_S = 10.0

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Readiness:
    """Tracks the last completed read; ``on_read`` also runs then (at most once a second),
    e.g. to publish the time to a metric other processes read."""

    def __init__(
        self,
        *,
        window_s: float = READY_WINDOW_S,
        on_read: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self._on_read = on_read
        self._clock = clock
        self.last_read_at: float | None = None
        self._published_at = -1.0

    def read_completed(self) -> None:
        """A read from a request shard returned (with or without entries)."""
        now = self._clock()
        self.last_read_at = now
        if self._on_read is not None and now - self._published_at >= 1.0:
            self._published_at = now
            self._on_read()

    def ready(self) -> bool:
        """Whether a read completed within the window."""
        last = self.last_read_at
        return last is not None and self._clock() - last <= self.window_s


def health_app(metrics: WSGIApp, ready: Callable[[], bool]) -> WSGIApp:
    """``/healthz`` and ``/readyz`` in front of the metrics app (everything else)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _plain(start_response, "200 OK", b"ok\n")
        if path == "/readyz":
            try:
                ok = ready()
            except Exception:  # a probe must answer, never raise into the server
                ok = False
            if ok:
                return _plain(start_response, "200 OK", b"ready\n")
            return _plain(start_response, "503 Service Unavailable", b"not ready\n")
        return metrics(environ, start_response)

    return app


def _plain(start_response: StartResponse, status: str, body: bytes) -> list[bytes]:
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    )
    return [body]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood stderr."""


@dataclass(frozen=True, slots=True)
class HttpServer:
    """The HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``; :meth:`close` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.server.server_address[1])

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(registry: Collector, *, port: int, addr: str, ready: Callable[[], bool]) -> HttpServer:
    """Serve ``registry`` at ``/metrics`` plus the probes; ConfigError if it cannot listen."""

    class Server(ThreadingWSGIServer):
        """A per-call copy, so the address family is set for this server only."""

    try:
        family, _, _, _, sockaddr = next(
            iter(socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))
        )
        Server.address_family = family
        httpd = make_server(
            str(sockaddr[0]),
            port,
            health_app(make_wsgi_app(registry), ready),
            Server,
            handler_class=_Quiet,
        )
    except OSError as exc:
        raise ConfigError(
            f"SEALSTREAM_METRICS_PORT: cannot listen on {addr}:{port}: {exc.strerror}"
        ) from None
    thread = threading.Thread(target=httpd.serve_forever, name="sealstream-http", daemon=True)
    thread.start()
    return HttpServer(server=httpd, thread=thread)
