"""Operations subcommands of ``sealstream``: ``stats``, ``dlq``, ``session``, ``keys``.

A thin layer: parse, call :mod:`worker.stats`, :mod:`worker.dlq`,
:mod:`worker.session_admin` or :mod:`worker.rotation`, print. None of these
commands prints a key, a password or ciphertext beyond a short hex prefix.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import anyio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import dlq, rotation, session_admin, shards, stats
from worker.cluster import open_redis
from worker.errors import ConfigError
from worker.keys import MasterKeys
from worker.settings import Settings
from worker.streams import AnyRedis

T = TypeVar("T")
SubParsers = Any  # argparse's private _SubParsersAction


def add_commands(sub: SubParsers) -> None:
    """Register the operations subcommands on the ``sealstream`` parser."""
    p = sub.add_parser("stats", help="shards, pending work, dead letters, sessions (no key needed)")
    _common(p)
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=_seconds, default=2.0, help="seconds between refreshes")
    p.set_defaults(run=_stats)

    d = sub.add_parser("dlq", help="browse and purge dead letters (never decrypted)")
    dsub = d.add_subparsers(dest="dlq_command", required=True)
    lst = dsub.add_parser("list", help="the newest dead letters, newest first")
    _common(lst)
    _filters(lst)
    lst.add_argument("--limit", type=positive_int, default=20)
    lst.set_defaults(run=_dlq_list)
    show = dsub.add_parser("show", help="one dead letter by its id in P:dlq")
    _common(show)
    show.add_argument("id", help="the dead letter's entry id in P:dlq")
    show.set_defaults(run=_dlq_show)
    st = dsub.add_parser("stats", help="dead letters by reason")
    _common(st)
    _filters(st)
    st.set_defaults(run=_dlq_stats)
    purge = dsub.add_parser("purge", help="delete dead letters (all, or by --reason/--before)")
    _common(purge)
    _filters(purge)
    purge.add_argument("--yes", action="store_true", help="really delete (else: a dry run)")
    purge.set_defaults(run=_dlq_purge)

    s = sub.add_parser("session", help="live sessions: count by expiry, revoke")
    ssub = s.add_subparsers(dest="session_command", required=True)
    sl = ssub.add_parser("list", help="live sessions by time left (no secrets)")
    _common(sl)
    sl.set_defaults(run=_session_list)
    rv = ssub.add_parser("revoke", help="delete a session's sealed record")
    _common(rv)
    rv.add_argument("sid", help="the session id (32 hex chars)")
    rv.set_defaults(run=_session_revoke)

    k = sub.add_parser("keys", help="master keys: records per key, rotation")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    ks = ksub.add_parser("status", help="live session records per master key id (no key needed)")
    _common(ks)
    ks.set_defaults(run=_keys_status)
    rot = ksub.add_parser(
        "rotate-master",
        help="re-seal every session record under the first key of SEALSTREAM_MASTER_KEY_FILE",
    )
    _common(rot)
    rot.set_defaults(run=_keys_rotate)
    sh = sub.add_parser("shards", help="request shards: grow them while workers run")
    shsub = sh.add_subparsers(dest="shards_command", required=True)
    sset = shsub.add_parser("set", help="set P:config shards (refused below a shard in use)")
    _common(sset)
    sset.add_argument("n", type=positive_int, help="the number of request shards")
    sset.set_defaults(run=_shards_set)

    new = ksub.add_parser("new-master", help="write a new master key file (one line, 0600)")
    new.add_argument("--out", required=True, type=Path, help="the file to create")
    new.set_defaults(run=_keys_new)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="SEALSTREAM_REDIS_URL")
    p.add_argument("--prefix", help="SEALSTREAM_PREFIX")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reason", help=f"only this reason ({', '.join(dlq.REASONS)})")
    p.add_argument(
        "--before", help="only those added before: a duration ago (7d, 12h), ISO 8601, or epoch ms"
    )


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected 0.1 to 3600 seconds, got {text}")
    return value


def settings_from(args: argparse.Namespace) -> Settings:
    """``SEALSTREAM_*`` settings with ``--redis-url``/``--prefix`` applied."""
    base = Settings.from_env()
    overrides = {
        name: getattr(args, name)
        for name in ("redis_url", "prefix")
        if getattr(args, name, None) is not None
    }
    return replace(base, **overrides).validated()


def with_redis(args: argparse.Namespace, body: Callable[[AnyRedis, str], Awaitable[T]]) -> T:
    """Run ``body(redis, prefix)`` on a connection named ``sealstream-admin``."""
    settings = settings_from(args)

    async def run() -> T:
        redis = await open_redis(
            settings.redis_url, name="sealstream-admin", cluster=settings.cluster
        )
        try:
            return await body(redis, settings.prefix)
        finally:
            await redis.aclose()

    return anyio.run(run)


def _print_json(value: Any) -> None:
    print(json.dumps(value))


def _emit(args: argparse.Namespace, doc: Any, lines: list[str]) -> None:
    """``doc`` as JSON with ``--json``, else the human ``lines``."""
    if args.json:
        _print_json(doc)
    else:
        print("\n".join(lines))


def _count_lines(title: str, total: int, rows: dict[str, int]) -> list[str]:
    return [f"{title}: {total}", *(f"  {name:<16} {n}" for name, n in rows.items())]


def _where(args: argparse.Namespace, now_ms: int) -> dlq.Filter:
    reason = dlq.check_reason(args.reason)
    before = dlq.parse_before(args.before, now_ms=now_ms) if args.before else None
    return dlq.Filter(reason=reason, before_ms=before)


# -- stats -------------------------------------------------------------------------


def _stats(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()

    async def body(redis: AnyRedis, prefix: str) -> int:
        if not args.watch:
            return await show(redis, prefix)
        # SIGINT/SIGTERM cancel the watch's scope, which stays cancelled: a cancellation
        # lost in a library's wait (asyncio.wait_for on Python 3.11 can swallow one)
        # is delivered again at the next await, instead of the watch running on.
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_signal, tg.cancel_scope)
            await show(redis, prefix)
        return 0

    async def show(redis: AnyRedis, prefix: str) -> int:
        while True:
            try:
                snapshot = await stats.collect(redis, prefix=prefix)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if not args.watch:
                    raise
                # A watch rides out an outage: say so, and try again next interval.
                print(f"redis unavailable ({type(exc).__name__}); retrying", file=sys.stderr)
            else:
                if args.json:
                    _print_json(stats.to_json(snapshot))
                else:
                    # Refreshed in place on a terminal; appended when piped.
                    clear = "\x1b[H\x1b[2J" if args.watch and tty else ""
                    print(clear + stats.render(snapshot))
                sys.stdout.flush()
            if not args.watch:
                return 0
            await anyio.sleep(args.interval)

    try:
        return with_redis(args, body)
    except KeyboardInterrupt:
        return 0


async def _cancel_on_signal(scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` at the first SIGINT or SIGTERM."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


# -- dlq ---------------------------------------------------------------------------


def _letter_lines(letter: dlq.DeadLetter) -> list[str]:
    orig = letter.original
    if orig is not None:
        original = f"{orig.field}: {orig.size} bytes, starts {orig.prefix_hex}"
    else:
        original = f"not kept; the entry was {letter.size} bytes"
    rows = [
        ("id", letter.id),
        ("added", _when(letter.added_ms)),
        ("reason", letter.reason),
        ("stream", letter.stream),
        ("entry id", letter.entry_id),
        ("sid", letter.sid),
        ("mid", letter.mid),
        ("type", letter.type),
        ("attempts", letter.attempts),
        ("worker", letter.worker),
        ("at (worker clock)", _when(letter.at_ms) if letter.at_ms is not None else None),
        ("original", original),
    ]
    return [f"{name:<18} {'-' if value is None else value}" for name, value in rows]


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def _dlq_list(args: argparse.Namespace) -> int:
    async def body(redis: AnyRedis, prefix: str) -> int:
        where = _where(args, await dlq.server_time_ms(redis))
        letters = await dlq.list_letters(redis, prefix=prefix, limit=args.limit, where=where)
        if args.json:
            _print_json([letter.to_json() for letter in letters])
            return 0
        if not letters:
            print("no dead letters")
        for letter in letters:
            orig = letter.original
            what = f"{orig.field} {orig.size}B" if orig else f"size {letter.size}B"
            print(
                f"{letter.id}  {_when(letter.added_ms)}  {letter.reason or '-':<15}"
                f" type={letter.type or '-'} sid={letter.sid or '-'} mid={letter.mid or '-'}"
                f" attempts={letter.attempts or '-'} {what}"
            )
        return 0

    return with_redis(args, body)


def _dlq_show(args: argparse.Namespace) -> int:
    dlq.check_id(args.id)

    async def body(redis: AnyRedis, prefix: str) -> int:
        letter = await dlq.show_letter(redis, args.id, prefix=prefix)
        if letter is None:
            print(f"sealstream: no dead letter {args.id}", file=sys.stderr)
            return 1
        if args.json:
            _print_json(letter.to_json())
        else:
            print("\n".join(_letter_lines(letter)))
        return 0

    return with_redis(args, body)


def _dlq_stats(args: argparse.Namespace) -> int:
    async def body(redis: AnyRedis, prefix: str) -> int:
        where = _where(args, await dlq.server_time_ms(redis))
        counts = await dlq.count_letters(redis, prefix=prefix, where=where)
        doc = {"total": counts.total, "by_reason": counts.by_reason}
        _emit(args, doc, _count_lines("dead letters", counts.total, counts.by_reason))
        return 0

    return with_redis(args, body)


def _dlq_purge(args: argparse.Namespace) -> int:
    async def body(redis: AnyRedis, prefix: str) -> int:
        where = _where(args, await dlq.server_time_ms(redis))
        if args.yes:
            counts = await dlq.purge_letters(redis, prefix=prefix, where=where)
        else:
            counts = await dlq.count_letters(redis, prefix=prefix, where=where)
        doc = {"purged": args.yes, "total": counts.total, "by_reason": counts.by_reason}
        title = "purged" if args.yes else "dry run (add --yes to delete), would purge"
        _emit(args, doc, _count_lines(title, counts.total, counts.by_reason))
        return 0

    return with_redis(args, body)


# -- session -----------------------------------------------------------------------


def _session_list(args: argparse.Namespace) -> int:
    async def body(redis: AnyRedis, prefix: str) -> int:
        counts = await session_admin.count_sessions(redis, prefix=prefix)
        doc = {"live": counts.total, "by_expiry": counts.by_expiry}
        _emit(
            args, doc, _count_lines("live sessions, by time left", counts.total, counts.by_expiry)
        )
        return 0

    return with_redis(args, body)


def _session_revoke(args: argparse.Namespace) -> int:
    session_admin.check_sid(args.sid)

    async def body(redis: AnyRedis, prefix: str) -> int:
        found = await session_admin.revoke_session(redis, args.sid, prefix=prefix)
        if args.json:
            _print_json({"sid": args.sid, "revoked": found})
        elif found:
            print(f"revoked session {args.sid}")
        else:
            print(f"sealstream: no live session {args.sid}", file=sys.stderr)
        return 0 if found else 1

    return with_redis(args, body)


# -- keys --------------------------------------------------------------------------


def _ring_or_none() -> MasterKeys | None:
    """The configured key ring when one is set and valid; ``keys status`` needs none."""
    try:
        return Settings.from_env().load_master_keys()
    except ConfigError:
        return None


def _keys_status(args: argparse.Namespace) -> int:
    ring = _ring_or_none()

    def role(kek: str) -> str:
        if ring is None:
            return "unknown"
        if kek == ring.active.id:
            return "active"
        return "older" if ring.get(kek) is not None else "not in ring"

    async def body(redis: AnyRedis, prefix: str) -> int:
        counts = await rotation.kek_status(redis, prefix=prefix)
        if args.json:
            _print_json(
                {
                    "live": counts.total,
                    "by_kek": counts.by_kek,
                    "ring": list(ring.ids) if ring is not None else None,
                }
            )
            return 0
        print(f"live session records: {counts.total}")
        for kek, n in counts.by_kek.items():
            print(f"  {kek:<18} {n:>8}  {role(kek)}")
        if ring is not None:
            for kek in ring.ids:
                if kek not in counts.by_kek:
                    print(f"  {kek:<18} {0:>8}  {role(kek)}")
        return 0

    return with_redis(args, body)


def _keys_rotate(args: argparse.Namespace) -> int:
    ring = Settings.from_env().load_master_keys()
    bar = sys.stderr.isatty() and not args.json

    def progress(done: int, total: int) -> None:
        if bar:
            width = 30
            filled = width * done // total if total else width
            print(
                f"\rre-sealing [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
                end="",
                file=sys.stderr,
                flush=True,
            )

    async def body(redis: AnyRedis, prefix: str) -> int:
        report = await rotation.rotate_master(redis, ring, prefix=prefix, progress=progress)
        if bar:
            print(file=sys.stderr)
        if args.json:
            doc = report._asdict()
            doc["remaining"] = {"live": report.remaining.total, "by_kek": report.remaining.by_kek}
            _print_json(doc)
        else:
            print(
                f"active key {report.active}: {report.resealed} re-sealed,"
                f" {report.already_active} already under it, {report.gone} gone meanwhile,"
                f" {report.failed} failed to open (left as they are)"
            )
            others = {k: n for k, n in report.remaining.by_kek.items() if k != report.active}
            if others:
                print("still in use: " + ", ".join(f"{k} ({n})" for k, n in others.items()))
            print("removable from the ring: " + (", ".join(report.removable) or "none"))
        return 0 if report.failed == 0 else 1

    return with_redis(args, body)


def _keys_new(args: argparse.Namespace) -> int:
    key = rotation.write_new_master_key(args.out)
    print(f"wrote {args.out}; key id:", file=sys.stderr)
    print(key.id)
    return 0


# -- shards ------------------------------------------------------------------------


def _shards_set(args: argparse.Namespace) -> int:
    async def body(redis: AnyRedis, prefix: str) -> int:
        before = await shards.set_shards(redis, args.n, prefix=prefix)
        if args.json:
            _print_json({"shards": args.n, "before": before})
        else:
            print(f"shards: {before} -> {args.n}")
        return 0

    return with_redis(args, body)
