"""``sealstream gateway``: HTTP in front of Redis for clients that cannot reach it.

The gateway holds no key. It forwards sealed envelopes and reply entries as
they are, and sees what Redis sees (ids, sizes, timing)::

    GET  /v1/config            the service public key and kid (from P:config)
    POST /v1/requests          one sealed request envelope as JSON (the ``j``
                               encoding), validated as a worker does before any
                               crypto (worker.wire.decode_request), then XADD to
                               shard int(mid[:8], 16) % shards
    GET  /v1/replies/{sid}     server-sent events: one per entry of the session's
                               reply stream; event id = entry id; resumes after
                               Last-Event-ID (or ?after=)
    GET  /demo                 a demo page (only with --demo)

An event's data is a JSON object of the entry's fields, each value as canonical
base64 (``{"j": "eyJ2Ijox..."}``): entries pass through byte for byte, forged
or not, and the client's strict decoders judge them.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import redis.asyncio as aioredis
import uvicorn
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from worker import wire
from worker.cluster import initial_client, probed, store_for
from worker.errors import ProtocolError, Unsupported
from worker.gatelimits import GatewayMetrics, RateLimiter, StreamSlots
from worker.gatewayconf import GatewaySettings
from worker.health import HttpServer
from worker.health import serve as serve_http
from worker.keyspace import Names
from worker.logging import get_logger
from worker.settings import Settings, redacted_url
from worker.streams import Entry

log = get_logger("sealstream.gateway")

_SID = re.compile(r"[0-9a-f]{32}")
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_CONFIG_TTL_S = 5.0
_DEMO_PAGE = Path(__file__).with_name("gateway_demo.html")
# The JavaScript client, served to the demo page from a source checkout.
_JS_SRC = Path(__file__).resolve().parent.parent / "clients" / "js" / "src"


def _error(status: int, code: str, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Config:
    kid: str
    public_pem: str
    shards: int
    read_at: float


class Gateway:
    """The gateway's state: one Redis pool, limits, metrics; routes are its methods."""

    def __init__(
        self,
        settings: GatewaySettings,
        worker_settings: Settings,
        *,
        redis: aioredis.Redis | None = None,
        metrics: GatewayMetrics | None = None,
        demo_js_dir: Path = _JS_SRC,
    ) -> None:
        self.settings = settings
        self.demo_js_dir = demo_js_dir
        client = redis or initial_client(worker_settings.redis_url, cluster=worker_settings.cluster)
        self.store = store_for(client, Names(worker_settings.prefix))
        self._owned = redis is None
        self._probe = (
            None if redis is not None else (worker_settings.redis_url, worker_settings.cluster)
        )
        # The entry is the field name "j" plus the body.
        self.max_body = settings.max_body or worker_settings.max_entry_size - 1
        self.max_entry_size = worker_settings.max_entry_size
        self.metrics = metrics or GatewayMetrics()
        self.rates = RateLimiter(rate=settings.rate, burst=settings.burst)
        self.slots = StreamSlots(
            total=settings.max_streams, per_client=settings.max_streams_per_client
        )
        self._config: _Config | None = None
        self._stopping = anyio.Event()
        #: polled while serving; true once the server is shutting down (uvicorn's
        #: should_exit), so open event streams end before the graceful timeout
        self.should_exit: Callable[[], bool] = lambda: False

    def stop(self) -> None:
        """End every open event stream (clients resume elsewhere from their last id)."""
        self._stopping.set()

    async def _watch_exit(self) -> None:
        # uvicorn signals shutdown by a flag it polls every 0.1 s; so do we.
        while not self.should_exit():  # noqa: ASYNC110 - a flag, not an event, is what there is
            await anyio.sleep(0.1)
        self.stop()

    async def _open(self) -> None:
        """Ask the node whether it is in a cluster (a plain URL may name any node)."""
        if self._probe is not None:
            url, mode = self._probe
            self._probe = None
            self.store = await probed(self.store, url, mode)

    async def aclose(self) -> None:
        """Close the Redis pool if the gateway made it."""
        if self._owned:
            await self.store.redis.aclose()

    def app(self) -> Starlette:
        """The ASGI application."""
        routes = [
            Route("/v1/config", self._counted("config", self.config), methods=["GET"]),
            Route("/v1/requests", self._counted("requests", self.post_request), methods=["POST"]),
            Route("/v1/replies/{sid}", self.replies, methods=["GET"]),
        ]
        if self.settings.demo:
            routes += [
                Route("/demo", self.demo_page, methods=["GET"]),
                Route("/demo/js/{name}", self.demo_script, methods=["GET"]),
            ]
        middleware = []
        if self.settings.cors_origins:
            middleware.append(
                Middleware(
                    CORSMiddleware,
                    allow_origins=list(self.settings.cors_origins),
                    allow_methods=["GET", "POST"],
                    allow_headers=["Content-Type", "Last-Event-ID"],
                    max_age=600,
                )
            )

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            try:
                await self._open()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch_exit)
                    yield
                    tg.cancel_scope.cancel()
            finally:
                await self.aclose()

        return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)

    def _counted(
        self, route: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            response = await handler(request)
            self.metrics.requests.labels(route, str(response.status_code)).inc()
            return response

        return endpoint

    def _refuse(self, reason: str, status: int, detail: str, **headers: str) -> JSONResponse:
        self.metrics.refused.labels(reason).inc()
        return _error(status, reason, detail, **headers)

    async def _read_config(self) -> _Config | None:
        now = time.monotonic()
        if self._config is not None and now - self._config.read_at < _CONFIG_TTL_S:
            return self._config
        raw = await self.store.read_config()
        try:
            config = _Config(
                kid=raw["kid"],
                public_pem=raw["servicePublicKey"],
                shards=int(raw.get("shards", "1")),
                read_at=now,
            )
        except (KeyError, ValueError):
            return None
        if config.shards < 1:
            return None
        self._config = config
        return config

    def _unavailable(self, exc: Exception) -> JSONResponse:
        log.warning("gateway_redis_error", error_type=type(exc).__name__)
        return self._refuse(
            "redis_unavailable", 503, "Redis is unavailable", **{"Retry-After": "1"}
        )

    async def config(self, request: Request) -> Response:
        """GET /v1/config: ``{kid, servicePublicKey, shards}``, as workers published it."""
        try:
            config = await self._read_config()
        except (RedisError, OSError) as exc:
            return self._unavailable(exc)
        if config is None:
            return self._refuse("no_config", 503, "no worker has published its config yet")
        return JSONResponse(
            {"kid": config.kid, "servicePublicKey": config.public_pem, "shards": config.shards},
            headers={"Cache-Control": "no-store"},
        )

    def _client(self, request: Request) -> str:
        return request.client.host if request.client is not None else "unknown"

    def _rate_limited(self, request: Request) -> JSONResponse | None:
        """A 429 when the client has spent its tokens (POSTs and stream opens)."""
        wait = self.rates.take(self._client(request), time.monotonic())
        if not wait:
            return None
        return self._refuse(
            "rate_limited", 429, "too many requests", **{"Retry-After": str(int(wait) + 1)}
        )

    async def post_request(self, request: Request) -> Response:
        """POST /v1/requests: validate one JSON envelope as a worker would, then XADD it."""
        if (limited := self._rate_limited(request)) is not None:
            return limited
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return self._refuse("media_type", 415, "the body must be application/json")
        body = await self._body(request)
        if body is None:
            return self._refuse("too_large", 413, f"the envelope is over {self.max_body} bytes")
        try:
            envelope = wire.decode_request({b"j": body}, max_size=self.max_entry_size)
        except ProtocolError as exc:
            reason = "unsupported" if isinstance(exc, Unsupported) else "malformed"
            log.info("request_refused", reason=reason, detail=exc.detail, size=len(body))
            return self._refuse(reason, 400, exc.detail)
        try:
            config = await self._read_config()
            if config is None:
                return self._refuse("no_config", 503, "no worker has published its config yet")
            shard = self.store.names.default_shard(envelope.mid, config.shards)
            # Forwarded byte for byte: the gateway changes nothing it cannot read.
            entry_id = await self.store.add_request(shard, {"j": body})
        except (RedisError, OSError) as exc:
            # The client retries; a copy that did land gets a ``replay`` notice.
            return self._unavailable(exc)
        self.metrics.forwarded_bytes.inc(len(body))
        log.info(
            "request_forwarded",
            session_id=envelope.sid,
            message_id=envelope.mid,
            shard=shard,
            size=len(body),
        )
        return JSONResponse({"mid": envelope.mid, "id": entry_id}, status_code=202)

    async def _body(self, request: Request) -> bytes | None:
        """The body, or None once it is over the limit (read no further than that)."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return None
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    return None
                chunks.append(chunk)
        except ClientDisconnect:
            return b""
        return b"".join(chunks)

    async def replies(self, request: Request) -> Response:
        """GET /v1/replies/{sid}: the session's reply entries as server-sent events."""
        sid = request.path_params["sid"]
        if _SID.fullmatch(sid) is None:
            return self._refuse("bad_id", 404, "a session id is 32 lowercase hex characters")
        after = request.headers.get("last-event-id") or request.query_params.get("after") or "0-0"
        if _ENTRY_ID.fullmatch(after) is None:
            return self._refuse("bad_id", 400, "Last-Event-ID is not a stream entry id")
        if (limited := self._rate_limited(request)) is not None:
            # Reconnect storms cost tokens too.
            self.metrics.requests.labels("replies", "429").inc()
            return limited
        client = self._client(request)
        if (why := self.slots.acquire(client)) is not None:
            self.metrics.requests.labels("replies", "429").inc()
            detail = "too many open event streams"
            if why == "client":
                detail += " from this client"
            return self._refuse("streams_exhausted", 429, detail, **{"Retry-After": "5"})
        self.metrics.requests.labels("replies", "200").inc()
        self.metrics.open_streams.inc()
        return _SlotReleasing(self._events(sid, after), on_close=lambda: self._closed(client))

    def _closed(self, client: str) -> None:
        self.slots.release(client)
        self.metrics.open_streams.dec()

    async def _events(self, sid: str, after: str) -> AsyncIterator[bytes]:
        started, sent = time.monotonic(), 0
        log.info("replies_opened", session_id=sid, after=after)
        block_ms = int(self.settings.keepalive_s * 1000)
        try:
            yield b"retry: 1000\n\n"
            while True:
                try:
                    entries = await self._read_unless_stopping(sid, after, block_ms)
                except (RedisError, OSError) as exc:
                    # The client reconnects (retry: 1000) and resumes from its last id.
                    log.warning(
                        "replies_redis_error", session_id=sid, error_type=type(exc).__name__
                    )
                    return
                if entries is None:
                    return
                if not entries:
                    yield b": keepalive\n\n"
                    continue
                chunks = []
                for entry in entries:
                    after = entry.id
                    data = json.dumps(
                        {
                            k.decode("utf-8", "replace"): base64.b64encode(v).decode("ascii")
                            for k, v in entry.fields.items()
                        },
                        separators=(",", ":"),
                    )
                    chunks.append(f"id: {entry.id}\nevent: reply\ndata: {data}\n\n".encode())
                sent += len(entries)
                self.metrics.events.inc(len(entries))
                yield b"".join(chunks)
        finally:
            log.info(
                "replies_closed",
                session_id=sid,
                events=sent,
                duration_s=round(time.monotonic() - started, 3),
            )

    async def _read_unless_stopping(
        self, sid: str, after: str, block_ms: int
    ) -> list[Entry] | None:
        """One blocking read of reply entries, or None as soon as the gateway stops."""
        result: list[Entry] | None = None
        # The task group lives within this one await, never across the generator's yield.
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                nonlocal result
                result = await self.store.read_replies(sid, after=after, block_ms=block_ms)
                tg.cancel_scope.cancel()

            async def stopped() -> None:
                await self._stopping.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(read)
            tg.start_soon(stopped)
        return result

    async def demo_page(self, request: Request) -> Response:
        """GET /demo: the demo page (the kid to pin comes in ?kid=)."""
        if not (self.demo_js_dir / "index.js").is_file():
            return _error(503, "no_demo", "the demo page needs a source checkout (clients/js/src)")
        return FileResponse(_DEMO_PAGE, media_type="text/html; charset=utf-8")

    async def demo_script(self, request: Request) -> Response:
        """GET /demo/js/{name}: the JavaScript client's modules, for the demo page."""
        name = request.path_params["name"]
        path = self.demo_js_dir / name
        if re.fullmatch(r"[a-z]+\.js", name) is None or not path.is_file():
            return _error(404, "not_found", "no such module")
        return FileResponse(path, media_type="text/javascript; charset=utf-8")


class _SlotReleasing(StreamingResponse):
    """A server-sent-event response that gives its stream slot back however it ends.

    The accounting wraps the whole ASGI call, so a dropped connection (the
    response cancelled mid-stream) releases the slot as surely as a clean end.
    (Starlette's documented way to change a response is a subclass.)
    """

    def __init__(self, body: AsyncIterator[bytes], *, on_close: Callable[[], None]) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def serve(settings: GatewaySettings, worker_settings: Settings) -> None:
    """Run the gateway with uvicorn until SIGTERM/SIGINT."""
    metrics = GatewayMetrics()
    gateway = Gateway(settings, worker_settings, metrics=metrics)
    app = gateway.app()
    metrics_server: HttpServer | None = None
    if worker_settings.metrics_port is not None:
        metrics_server = serve_http(
            metrics.registry,
            port=worker_settings.metrics_port,
            addr=worker_settings.metrics_addr,
            ready=lambda: True,
        )
    log.info(
        "gateway_starting",
        host=settings.host,
        port=settings.port,
        redis=redacted_url(worker_settings.redis_url),
        prefix=worker_settings.prefix,
        demo=settings.demo,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        # Open event streams end at once on shutdown; clients resume elsewhere.
        timeout_graceful_shutdown=1,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    gateway.should_exit = lambda: server.should_exit
    # uvicorn handles SIGTERM/SIGINT (a graceful stop), then raises the signal again
    # with the handler it found: with these no-op handlers that ends the process with
    # 0, as the worker does, rather than by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        anyio.run(server.serve)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        log.info("gateway_stopped")
