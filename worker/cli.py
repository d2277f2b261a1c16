"""The ``sealstream`` command line: ``keygen``, ``worker``, ``send``, ``gateway``, ``demo``,
and the operations commands ``stats``, ``dlq``, ``session``, ``keys`` (:mod:`worker.cli_ops`).

Flags override ``SEALSTREAM_*`` variables. Configuration errors print one line
naming the setting and exit 2.

Credentials never reach the terminal: a Redis URL is shown only through
:func:`~worker.settings.redacted_url`, and everything :func:`main` prints about an
error (usage errors included, for every subcommand) first goes through
:func:`_scrub`, which also removes the Redis password and the master key wherever
they were given.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote

import anyio
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

from worker import cli_ops
from worker.errors import ConfigError, InvalidArgument, SealstreamError, StartupFailed
from worker.handlers import App
from worker.keypool import HANDSHAKE_THREADS
from worker.logging import configure, get_logger
from worker.settings import Settings, redacted_url

#: Set by ``worker --processes`` in its children's environment (internal).
SUPERVISOR_PID = "SEALSTREAM_SUPERVISOR_PID"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sealstream`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        try:
            return int(args.run(args))
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
    except (ConfigError, InvalidArgument) as exc:
        _error(f"sealstream: error: {exc}", args)
        return 2
    except StartupFailed as exc:
        _error(f"sealstream: error: {exc}", args)
        return 3
    except SealstreamError as exc:
        _error(f"sealstream: {type(exc).__name__}: {exc}", args)
        return 1
    except RedisError as exc:
        url = getattr(args, "redis_url", None) or os.environ.get("SEALSTREAM_REDIS_URL")
        # redis-py's texts name host and port, but are scrubbed all the same.
        _error(f"sealstream: error: Redis ({_shown(url)}): {type(exc).__name__}: {exc}", args)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A bug: keep the traceback, without the secrets its texts may quote.
        _error("".join(traceback.format_exception(exc)).rstrip(), args)
        return 1


# userinfo of any URL: ``scheme://user:password@`` -> ``scheme://***@``
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/@]*@")


def _secrets(args: argparse.Namespace | None) -> set[str]:
    """Secrets given by environment or flag: Redis passwords, the master key."""
    found = {os.environ.get("SEALSTREAM_MASTER_KEY", "")}
    for url in (os.environ.get("SEALSTREAM_REDIS_URL"), getattr(args, "redis_url", None)):
        # Greedy up to the last "@" before the path: a password may hold an "@".
        for userinfo in re.findall(r"://([^\s/]*)@", url or ""):
            password = userinfo.partition(":")[2]
            found |= {password, unquote(password)}
    return {s for s in found if len(s) >= 3}  # a 1-char "password" would garble the text


def _scrub(text: str, args: argparse.Namespace | None = None) -> str:
    """``text`` without URL credentials or any secret given by environment or flag."""
    text = _USERINFO.sub(r"\1***@", text)
    for secret in sorted(_secrets(args), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _error(text: str, args: argparse.Namespace) -> None:
    print(_scrub(text, args), file=sys.stderr)


def _shown(url: str | None) -> str:
    """A Redis URL as it may be shown: without credentials."""
    if not url:
        return "default URL"
    try:
        return redacted_url(url)
    except ValueError:
        return "unparsable URL"


class _Parser(argparse.ArgumentParser):
    """argparse that scrubs its usage errors (they quote argv, which may hold a URL)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {_scrub(message)}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sealstream", description="Encrypted Redis Streams workers.")
    sub = parser.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", help="write a service key pair and a master key")
    keygen.add_argument("--dir", required=True, type=Path, help="directory for the key files")
    keygen.add_argument("--bits", type=int, default=2048, choices=(2048, 3072, 4096))
    keygen.set_defaults(run=_keygen)

    worker = sub.add_parser("worker", help="run a worker process")
    worker.add_argument("app", nargs="?", help="module:attribute of the App (default: demo app)")
    worker.add_argument(
        "--concurrency", type=int, help="handlers run at once (SEALSTREAM_CONCURRENCY)"
    )
    worker.add_argument("--burst", action="store_true", help="exit once the shards are drained")
    worker.add_argument("--shards", type=int, help="request shards (SEALSTREAM_SHARDS)")
    worker.add_argument("--redis-url", help="SEALSTREAM_REDIS_URL")
    worker.add_argument("--prefix", help="SEALSTREAM_PREFIX")
    worker.add_argument(
        "--grace", type=float, help="seconds to finish in-flight work on stop (SEALSTREAM_GRACE_S)"
    )
    worker.add_argument(
        "--metrics-port", type=int, help="serve Prometheus /metrics (SEALSTREAM_METRICS_PORT)"
    )
    worker.add_argument(
        "--processes",
        type=_positive,
        help="run N worker processes under a supervisor (restarts, one /metrics)",
    )
    worker.set_defaults(run=_worker)

    send = sub.add_parser("send", help="send one request and print its reply")
    send.add_argument("type", help="handler type")
    send.add_argument("payload", help="JSON payload")
    send.add_argument("--kid", help="pinned service kid (SEALSTREAM_KID)")
    send.add_argument(
        "--service-public-key-file", type=Path, help="SEALSTREAM_SERVICE_PUBLIC_KEY_FILE"
    )
    send.add_argument("--alg", default="SK+A256GCM", choices=("SK+A256GCM", "RSA-OAEP-256+A256GCM"))
    send.add_argument("--encoding", default="e", choices=("e", "j"))
    send.add_argument("--timeout", type=float, default=30.0)
    send.add_argument("--redis-url", help="SEALSTREAM_REDIS_URL")
    send.add_argument("--prefix", help="SEALSTREAM_PREFIX")
    send.set_defaults(run=_send)

    from worker.gatewayconf import add_parser as add_gateway_parser

    add_gateway_parser(sub)

    demo = sub.add_parser("demo", help="run workers and a producer on a private Redis")
    demo.add_argument("--workers", type=_positive, default=2)
    demo.add_argument("--sessions", type=_positive, default=8)
    demo.add_argument("--jobs", type=_positive, default=400)
    demo.set_defaults(run=_demo)

    cli_ops.add_commands(sub)
    return parser


_positive = cli_ops.positive_int


def _keygen(args: argparse.Namespace) -> int:
    from worker.keys import write_keys

    try:
        service = write_keys(args.dir, bits=args.bits)
    except OSError as exc:
        raise ConfigError(f"keygen: cannot write to {args.dir}: {exc.strerror}") from None
    print(f"wrote {args.dir}/service.pem, service.pub.pem, master.key", file=sys.stderr)
    print(service.kid)
    return 0


def load_app(spec: str | None) -> App:
    """Import ``module:attribute`` (an :class:`App`); None gives the demo app."""
    if spec is None:
        from worker.demo_app import app

        return app
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"APP: expected module:attribute, got {spec!r}")
    # Like uvicorn and arq: an app module in the current directory is found as is.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"APP: cannot import {module_name!r}: {exc}") from None
    found = getattr(module, attr, None)
    if not isinstance(found, App):
        raise ConfigError(f"APP: {spec!r} is not a sealstream App")
    return found


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    overrides: dict[str, Any] = {}
    for flag, name in (
        ("redis_url", "redis_url"),
        ("prefix", "prefix"),
        ("concurrency", "concurrency"),
        ("shards", "shards"),
        ("grace", "grace_s"),
        ("metrics_port", "metrics_port"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "burst", False):
        overrides["burst"] = True
    if overrides.get("concurrency", 1) < 1 or overrides.get("shards", 1) < 1:
        raise ConfigError("--concurrency and --shards must be at least 1")
    settings = replace(settings, **overrides).validated()
    _check_redis_url(settings.redis_url)
    return settings


def _check_redis_url(url: str) -> None:
    """Refuse a URL redis-py cannot parse (bad port, query value) in one line."""
    from worker.cluster import is_sentinel_url, parse_sentinel_url

    if is_sentinel_url(url):
        parse_sentinel_url(url)  # ConfigError naming the part, never the URL
        return
    try:
        parse_url(url)
    except ValueError as exc:
        # The URL is not echoed; redis-py's reason names the part (scrubbed anyway).
        raise ConfigError(f"SEALSTREAM_REDIS_URL / --redis-url: {_scrub(str(exc))}") from None


def _worker(args: argparse.Namespace) -> int:
    from worker.runtime import Worker

    settings = _settings(args)
    configure(settings.log_level, settings.log_format)
    if args.processes is not None:
        return _supervise(args, settings)
    # Until the reload watcher listens, a SIGHUP (a supervisor forwarding one to a child
    # still starting, say) must not end the process, as its default action would.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    app = load_app(args.app)
    worker = Worker(
        app,
        settings,
        service_key=settings.load_service_key(),
        master_keys=settings.load_master_keys(),
        older_service_keys=settings.load_old_service_keys(),
    )

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, worker, tg.cancel_scope)
            tg.start_soon(_watch_reload, worker, settings)
            supervisor = os.environ.get(SUPERVISOR_PID, "")
            if supervisor.isdigit():
                tg.start_soon(_watch_supervisor, worker, int(supervisor))
            await worker.run()
            tg.cancel_scope.cancel()

    tune_gc()
    anyio.run(run)
    _exit_past_stuck_threads()
    return 0


#: Net new container objects between two young-generation collections (Python's
#: default: 700). A batch in flight holds a few thousand short-lived ones (about 15 a
#: request), so at 700 the collector ran ~14 times per 1,000 requests of a drain,
#: walking the same live batches and promoting them: 2.7-3.7 µs of CPU per request,
#: 6-9% of the worker's ~42 µs (SK 256 B), with pauses up to 1.7-5 ms (its full
#: passes). At 5,000 it ran ~0.2 times per 1,000 (0.01 s in a 60,000-request drain,
#: against 0.16-0.22 s) with pauses of at most ~1.5 ms. Only the CLI's worker
#: processes set it: an embedded ``Worker`` keeps its host's collector.
GC_YOUNG = 5_000


def tune_gc() -> None:
    """Set the worker process's collector up, once start-up is done."""
    # What start-up made (modules, the app, keys) lives as long as the process: keep
    # it out of the collector's full passes, which would walk it all (10-15 ms here,
    # a pause every request in flight then waits out).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def _supervise(args: argparse.Namespace, settings: Settings) -> int:
    from worker.supervisor import Supervisor, child_environment

    # Checked here so a bad key file is one line now, not N children failing in turn.
    settings.load_service_key()
    settings.load_master_keys()
    supervisor = Supervisor(
        processes=args.processes,
        args=[*([args.app] if args.app else []), *(["--burst"] if settings.burst else [])],
        env=child_environment(
            os.environ,
            settings,
            redis_url_flag=args.redis_url is not None,
            processes=args.processes,
        ),
        metrics_port=settings.metrics_port,
        metrics_addr=settings.metrics_addr,
        burst=settings.burst,
        stop_timeout_s=settings.grace_s + 15,
    )
    return anyio.run(supervisor.run)


#: seconds the worker's threads get to end at exit before they count as stuck
_THREADS_END_S = 0.5


def _exit_past_stuck_threads() -> None:
    """Exit now when a thread outlived the worker.

    Python cannot stop a thread, and the interpreter would wait for it at exit: a
    worker asked to stop would hang on a stuck handler, or on a session key its
    handshake lane is still making (at the lowest CPU priority that can take long on
    a busy machine). The worker has already written its replies and acks (an
    abandoned request was answered ``timeout``); a key made ahead is only thrown
    away. Only a handler's thread is worth a warning.
    """
    stuck = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and t.is_alive() and not t.daemon
    ]
    # An idle thread of anyio's pool is told to end when the event loop closes, and
    # may not have ended yet: give the threads that are not making keys a moment.
    deadline = time.monotonic() + _THREADS_END_S
    for t in stuck:
        if not t.name.startswith(HANDSHAKE_THREADS):
            t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in stuck if t.is_alive()]
    if stuck:
        handlers = [t for t in stuck if not t.name.startswith(HANDSHAKE_THREADS)]
        if handlers:
            get_logger("sealstream.worker").warning(
                "exit_past_stuck_handlers", threads=len(handlers)
            )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


async def _watch_supervisor(worker: Any, pid: int) -> None:
    """A supervised child whose supervisor is gone (killed with SIGKILL, which it cannot
    forward) stops gracefully instead of running on unsupervised."""
    while os.getppid() == pid:  # noqa: ASYNC110 - no event tells us; polled, as the OS
        await anyio.sleep(1.0)
    get_logger("sealstream.worker").warning("supervisor_gone", supervisor_pid=pid)
    worker.stop()


async def _watch_signals(worker: Any, scope: anyio.CancelScope) -> None:
    """First SIGTERM/SIGINT: graceful stop. A second: stop now."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        count = 0
        async for _ in signals:
            count += 1
            if count == 1:
                worker.stop()
            else:
                scope.cancel()
                return


def _load_keys(settings: Settings) -> tuple[Any, Any, Any]:
    return (
        settings.load_service_key(),
        settings.load_old_service_keys(),
        settings.load_master_keys(),
    )


async def _watch_reload(worker: Any, settings: Settings) -> None:
    """SIGHUP: re-read the service and master key files and swap them in; a file that
    does not load is logged and the keys in use are kept."""
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            try:
                # Parsing an RSA key checks it: milliseconds, off the event loop.
                service, older, master = await anyio.to_thread.run_sync(_load_keys, settings)
            except ConfigError as exc:
                get_logger("sealstream.worker").error("keys_reload_failed", error=str(exc))
                continue
            await worker.reload_keys(service, master, older_service_keys=older)


def _send(args: argparse.Namespace) -> int:
    from worker.client import Client
    from worker.errors import ClientError

    settings = _settings(args)
    configure(settings.log_level, settings.log_format)
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"PAYLOAD: not JSON: {exc.msg}") from None
    kid = args.kid or os.environ.get("SEALSTREAM_KID")
    pub_file = args.service_public_key_file or os.environ.get("SEALSTREAM_SERVICE_PUBLIC_KEY_FILE")
    pem = None
    if pub_file:
        try:
            pem = Path(pub_file).read_text()
        except OSError as exc:
            raise ConfigError(f"SEALSTREAM_SERVICE_PUBLIC_KEY_FILE: {exc.strerror}") from None
    if kid is None and pem is None:
        raise ConfigError(
            "pin the service key: --kid / SEALSTREAM_KID or --service-public-key-file"
        )

    async def run() -> Any:
        async with (
            Client.from_url(
                settings.redis_url,
                cluster=settings.cluster,
                kid=kid,
                service_public_key=pem,
                prefix=settings.prefix,
                encoding=args.encoding,
            ) as client,
            client.session(alg=args.alg, timeout=args.timeout) as session,
        ):
            return await session.request(args.type, payload, timeout=args.timeout)

    try:
        result = anyio.run(run)
    except ClientError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(result, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from worker.demo_runner import run_demo

    if os.environ.get("SEALSTREAM_REDIS_URL"):
        _check_redis_url(Settings.from_env().redis_url)
    return run_demo(workers=args.workers, sessions=args.sessions, jobs=args.jobs)
