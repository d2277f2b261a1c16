"""Settings and command line of ``sealstream gateway`` (no web stack imported here).

The gateway's own settings are ``SEALSTREAM_GATEWAY_*`` variables, overridden by
flags; Redis URL, prefix, entry size limit, logging and metrics port are the
worker's (:class:`worker.settings.Settings`), so a gateway and its workers read
one environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from worker.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    """How the gateway listens and what it lets through."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: largest POST /v1/requests body (the envelope as JSON); None: the worker's
    #: SEALSTREAM_MAX_ENTRY_SIZE less the field name, so nothing passes that a
    #: worker would refuse for its size
    max_body: int | None = None
    #: event streams open at once, in all and per client address
    max_streams: int = 200
    max_streams_per_client: int = 8
    #: per client address: requests per second (sustained) and burst
    rate: float = 20.0
    burst: int = 40
    #: origins allowed by CORS (``*`` for any); empty: same origin only
    cors_origins: tuple[str, ...] = ()
    #: seconds between keep-alive comments on an idle event stream
    keepalive_s: float = 10.0
    #: serve the demo page at /demo
    demo: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewaySettings:
        """Read ``SEALSTREAM_GATEWAY_*``; :class:`ConfigError` names a bad one."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(f"SEALSTREAM_GATEWAY_{name}") or None

        kwargs: dict[str, Any] = {}
        if (host := get("HOST")) is not None:
            kwargs["host"] = host
        for name, attr, kind in (
            ("PORT", "port", int),
            ("MAX_BODY", "max_body", int),
            ("MAX_STREAMS", "max_streams", int),
            ("MAX_STREAMS_PER_CLIENT", "max_streams_per_client", int),
            ("RATE", "rate", float),
            ("BURST", "burst", int),
            ("KEEPALIVE_S", "keepalive_s", float),
        ):
            raw = get(name)
            if raw is None:
                continue
            try:
                kwargs[attr] = kind(raw)
            except ValueError:
                raise ConfigError(
                    f"SEALSTREAM_GATEWAY_{name}: expected a number, got {raw!r}"
                ) from None
        if (origins := get("CORS_ORIGINS")) is not None:
            kwargs["cors_origins"] = _origins(origins)
        if (demo := get("DEMO")) is not None:
            kwargs["demo"] = demo.lower() in ("1", "true", "yes", "on")
        return cls(**kwargs).validated()

    def validated(self) -> GatewaySettings:
        """Check ranges; return self or raise :class:`ConfigError`."""
        if not 0 <= self.port <= 65535:
            raise ConfigError("SEALSTREAM_GATEWAY_PORT: expected 0..65535")
        if self.max_body is not None and self.max_body < 256:
            raise ConfigError("SEALSTREAM_GATEWAY_MAX_BODY: expected at least 256")
        if self.max_streams < 1 or self.max_streams_per_client < 1:
            raise ConfigError("SEALSTREAM_GATEWAY_MAX_STREAMS(_PER_CLIENT): expected at least 1")
        if not self.rate > 0 or self.burst < 1:
            raise ConfigError("SEALSTREAM_GATEWAY_RATE/BURST: expected a positive rate and burst")
        if not 0.1 <= self.keepalive_s <= 12:
            # Below the Redis client's 15 s socket timeout: a blocking read waits this long.
            raise ConfigError("SEALSTREAM_GATEWAY_KEEPALIVE_S: expected 0.1..12")
        return self


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(
                f"SEALSTREAM_GATEWAY_CORS_ORIGINS: {origin!r} is not * or an http(s) origin"
            )
    return origins


def add_parser(sub: Any) -> None:
    """Add the ``gateway`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("gateway", help="serve the HTTP gateway (it holds no key)")
    p.add_argument("--host", help="SEALSTREAM_GATEWAY_HOST (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="SEALSTREAM_GATEWAY_PORT (default 8080)")
    p.add_argument("--max-body", type=int, help="SEALSTREAM_GATEWAY_MAX_BODY (bytes)")
    p.add_argument("--max-streams", type=int, help="SEALSTREAM_GATEWAY_MAX_STREAMS")
    p.add_argument(
        "--max-streams-per-client", type=int, help="SEALSTREAM_GATEWAY_MAX_STREAMS_PER_CLIENT"
    )
    p.add_argument("--rate", type=float, help="SEALSTREAM_GATEWAY_RATE (requests/s per client)")
    p.add_argument("--burst", type=int, help="SEALSTREAM_GATEWAY_BURST")
    p.add_argument(
        "--cors-origin",
        action="append",
        dest="cors_origins",
        help="an allowed origin (repeat; SEALSTREAM_GATEWAY_CORS_ORIGINS, comma-separated)",
    )
    p.add_argument("--demo", action="store_true", default=None, help="serve /demo")
    p.add_argument("--redis-url", help="SEALSTREAM_REDIS_URL")
    p.add_argument("--prefix", help="SEALSTREAM_PREFIX")
    p.add_argument("--metrics-port", type=int, help="SEALSTREAM_METRICS_PORT")
    p.set_defaults(run=run)


def gateway_settings(args: argparse.Namespace) -> GatewaySettings:
    """Environment, then flags."""
    settings = GatewaySettings.from_env()
    overrides: dict[str, Any] = {}
    for name in (
        "host",
        "port",
        "max_body",
        "max_streams",
        "max_streams_per_client",
        "rate",
        "burst",
        "demo",
    ):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if args.cors_origins:
        overrides["cors_origins"] = _origins(",".join(args.cors_origins))
    return replace(settings, **overrides).validated()


def run(args: argparse.Namespace) -> int:
    """``sealstream gateway``: serve until SIGTERM/SIGINT."""
    from worker.cli import _settings
    from worker.logging import configure

    settings = _settings(args)
    gateway = gateway_settings(args)
    configure(settings.log_level, settings.log_format)
    try:
        from worker.gateway import serve
    except ImportError as exc:  # the extra is not installed
        raise ConfigError(
            f"the gateway needs its extra: pip install 'sealstream[gateway]' ({exc.name})"
        ) from None
    serve(gateway, settings)
    return 0
