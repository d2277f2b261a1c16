"""Worker settings: a frozen value read from ``SEALSTREAM_*`` variables (pure, except
that ``SEALSTREAM_REDIS_PASSWORD_FILE``, a container secret, is read at once).

CLI flags override the environment by building a new value with
:func:`dataclasses.replace`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from worker.errors import ConfigError
from worker.keys import (
    MasterKeys,
    ServiceKey,
    load_master_key_file,
    load_service_key,
    parse_master_keys,
)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
HANDSHAKE_PRIORITIES = ("idle", "low")
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
CLUSTER_MODES = ("auto", "yes", "no")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a worker is configured with. Secrets never appear in ``repr``."""

    redis_url: str = DEFAULT_REDIS_URL
    #: Redis Cluster: ``auto`` asks the node (``INFO cluster``); ``yes``/``no`` force it.
    cluster: str = "auto"
    prefix: str = "sealstream"
    service_key_file: Path | None = None
    #: Older service keys still accepted for handshakes (a key rotation's overlap).
    old_service_key_files: tuple[Path, ...] = ()
    master_key_file: Path | None = None
    master_key: str | None = field(default=None, repr=False)
    shards: int = 1
    concurrency: int = 32
    claim_idle_ms: int = 30_000
    replay_window_ms: int = 900_000
    delivery_limit: int = 10
    handler_timeout_s: float = 60.0
    grace_s: float = 30.0
    max_entry_size: int = 1024 * 1024
    reply_maxlen: int = 1000
    dlq_maxlen: int = 100_000
    dlq_copy_max: int = 64 * 1024
    handshake_concurrency: int = 1
    #: the handshake lane's CPU priority: "idle" (SCHED_IDLE) or "low" (nice 19)
    handshake_priority: str = "idle"
    #: session key pairs kept ready for handshakes (worker.keypool)
    handshake_pool: int = 16
    #: child processes doing RSA unwraps (worker.unwrapping); 0: threads; None: one
    #: per CPU
    unwrap_processes: int | None = None
    session_max_ttl_s: int = 86_400
    #: entries read ahead of the handlers; None: adaptive (worker.readahead)
    prefetch: int | None = None
    session_key_bits: int = 2048
    trim_interval_s: float = 10.0
    burst: bool = False
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    log_level: str = "info"
    log_format: str = "auto"
    #: One OpenTelemetry span per processed message (the extra ``sealstream[otel]``).
    otel: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``SEALSTREAM_*`` variables; :class:`ConfigError` names a bad one."""
        env = os.environ if environ is None else environ

        def text(name: str, default: str) -> str:
            return env.get(f"SEALSTREAM_{name}", default) or default

        def path(name: str) -> Path | None:
            value = env.get(f"SEALSTREAM_{name}")
            return Path(value) if value else None

        return cls(
            redis_url=_redis_url(env),
            cluster=text("CLUSTER", "auto").lower(),
            prefix=text("PREFIX", "sealstream"),
            service_key_file=path("SERVICE_KEY_FILE"),
            old_service_key_files=tuple(
                Path(p.strip())
                for p in env.get("SEALSTREAM_OLD_SERVICE_KEY_FILES", "").split(",")
                if p.strip()
            ),
            master_key_file=path("MASTER_KEY_FILE"),
            master_key=env.get("SEALSTREAM_MASTER_KEY") or None,
            shards=_int(env, "SHARDS", 1, low=1, high=1024),
            concurrency=_int(env, "CONCURRENCY", 32, low=1, high=10_000),
            claim_idle_ms=_int(env, "CLAIM_IDLE_MS", 30_000, low=100),
            replay_window_ms=_int(env, "REPLAY_WINDOW_MS", 900_000, low=1000),
            delivery_limit=_int(env, "DELIVERY_LIMIT", 10, low=1),
            handler_timeout_s=_float(env, "HANDLER_TIMEOUT_S", 60.0),
            grace_s=_float(env, "GRACE_S", 30.0),
            max_entry_size=_int(env, "MAX_ENTRY_SIZE", 1024 * 1024, low=1024),
            reply_maxlen=_int(env, "REPLY_MAXLEN", 1000, low=1),
            dlq_maxlen=_int(env, "DLQ_MAXLEN", 100_000, low=1),
            dlq_copy_max=_int(env, "DLQ_COPY_MAX", 64 * 1024, low=0),
            handshake_concurrency=_int(env, "HANDSHAKE_CONCURRENCY", 1, low=1, high=64),
            handshake_priority=text("HANDSHAKE_PRIORITY", "idle").lower(),
            handshake_pool=_int(env, "HANDSHAKE_POOL", 16, low=0, high=10_000),
            unwrap_processes=_int(env, "UNWRAP_PROCESSES", 0, low=0, high=64)
            if env.get("SEALSTREAM_UNWRAP_PROCESSES")
            else None,
            session_max_ttl_s=_int(env, "SESSION_MAX_TTL_S", 86_400, low=60),
            prefetch=_int(env, "PREFETCH", 0, low=1, high=10_000)
            if env.get("SEALSTREAM_PREFETCH")
            else None,
            metrics_port=_int(env, "METRICS_PORT", -1, low=0, high=65535)
            if env.get("SEALSTREAM_METRICS_PORT")
            else None,
            metrics_addr=text("METRICS_ADDR", "127.0.0.1"),
            session_key_bits=_int(env, "SESSION_KEY_BITS", 2048),
            log_level=text("LOG_LEVEL", "info").lower(),
            log_format=text("LOG_FORMAT", "auto").lower(),
            otel=_flag(env, "OTEL"),
        ).validated()

    @property
    def unwrap_processes_or_cpus(self) -> int:
        """``unwrap_processes``, or one per CPU when unset."""
        if self.unwrap_processes is not None:
            return self.unwrap_processes
        return os.cpu_count() or 2

    def validated(self) -> Settings:
        """Check cross-field rules; return self or raise :class:`ConfigError`."""
        if self.session_key_bits not in (2048, 3072, 4096):
            raise ConfigError("SEALSTREAM_SESSION_KEY_BITS: expected 2048, 3072 or 4096")
        if urlsplit(self.redis_url).scheme not in REDIS_SCHEMES:
            # The URL itself is not echoed: it may carry a password.
            raise ConfigError(
                "SEALSTREAM_REDIS_URL: expected a redis://, rediss://, unix:// or"
                " redis+sentinel:// URL"
            )
        if self.cluster not in CLUSTER_MODES:
            raise ConfigError("SEALSTREAM_CLUSTER: expected auto, yes or no")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"SEALSTREAM_LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}")
        if self.handshake_priority not in HANDSHAKE_PRIORITIES:
            raise ConfigError("SEALSTREAM_HANDSHAKE_PRIORITY: expected idle or low")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("SEALSTREAM_LOG_FORMAT: expected auto, json or console")
        if not self.prefix or any(c in self.prefix for c in "{} \n"):
            raise ConfigError("SEALSTREAM_PREFIX: must be non-empty, without braces or spaces")
        return self

    @property
    def in_flight_limit(self) -> int:
        """Entries a worker holds before and in its handlers at the start: running
        handlers plus those read ahead (an adaptive read-ahead moves it; entries whose
        replies are being written do not count)."""
        return self.concurrency + (self.prefetch if self.prefetch is not None else self.concurrency)

    def load_service_key(self) -> ServiceKey:
        """The service key pair from ``service_key_file``."""
        if self.service_key_file is None:
            raise ConfigError("SEALSTREAM_SERVICE_KEY_FILE is not set (see `sealstream keygen`)")
        return load_service_key(self.service_key_file)

    def load_old_service_keys(self) -> tuple[ServiceKey, ...]:
        """The older service keys from ``old_service_key_files`` (each must load)."""
        return tuple(
            load_service_key(path, setting="SEALSTREAM_OLD_SERVICE_KEY_FILES")
            for path in self.old_service_key_files
        )

    def load_master_keys(self) -> MasterKeys:
        """The KEK ring from ``master_key`` (base64) or ``master_key_file``."""
        if self.master_key:
            return parse_master_keys(self.master_key, setting="SEALSTREAM_MASTER_KEY")
        if self.master_key_file is None:
            raise ConfigError(
                "SEALSTREAM_MASTER_KEY_FILE or SEALSTREAM_MASTER_KEY is not set"
                " (see `sealstream keygen`)"
            )
        return load_master_key_file(self.master_key_file)


def _redis_url(env: Mapping[str, str]) -> str:
    """``SEALSTREAM_REDIS_URL`` with the password of ``SEALSTREAM_REDIS_PASSWORD_FILE``
    (a Docker/Kubernetes secret) put in, when that is set."""
    url = env.get("SEALSTREAM_REDIS_URL") or DEFAULT_REDIS_URL
    path = env.get("SEALSTREAM_REDIS_PASSWORD_FILE")
    if not path:
        return url
    setting = "SEALSTREAM_REDIS_PASSWORD_FILE"
    try:
        password = Path(path).read_text("utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{setting}: cannot read {path}: {reason}") from None
    if not password:
        raise ConfigError(f"{setting}: {path} is empty")
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError("SEALSTREAM_REDIS_URL: expected a redis://, rediss:// or unix:// URL")
    if parts.password is not None:
        raise ConfigError(f"{setting}: SEALSTREAM_REDIS_URL already has a password")
    user = quote(parts.username or "", safe="")
    netloc = f"{user}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
    return parts._replace(netloc=netloc).geturl()


def _int(
    env: Mapping[str, str], name: str, default: int, *, low: int = 0, high: int | None = None
) -> int:
    raw = env.get(f"SEALSTREAM_{name}")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"SEALSTREAM_{name}: expected an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"SEALSTREAM_{name}: expected {bound}, got {value}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(f"SEALSTREAM_{name}", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"SEALSTREAM_{name}: expected 1 or 0, got {raw!r}")


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(f"SEALSTREAM_{name}")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"SEALSTREAM_{name}: expected a number, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"SEALSTREAM_{name}: expected a positive number, got {raw!r}")
    return value


def redacted_url(url: str) -> str:
    """``url`` without its credentials, for logs: ``redis://***@host:6379/0``."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url.split("?", 1)[0]
    netloc = "***@" + parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc, query="").geturl()
