"""Master-key (KEK) rotation: which KEK seals each live session record, and re-sealing
every record under the active KEK.

A record is a MessagePack map whose ``kek`` field is in clear, so counting records
per KEK needs no key. Re-sealing opens a record with whichever KEK it names and
seals the same session under the ring's active KEK, then writes it back only if
the stored bytes are still the ones read (a compare-and-set script that keeps the
key's expiry): a record revoked, expired or rewritten meanwhile is never
resurrected or clobbered. Workers must already hold the new KEK (see the README's
rotation procedure) or they cannot open re-sealed records.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import redis.asyncio as aioredis

from worker.codec import DecodeError, loads
from worker.errors import ConfigError, DecryptError
from worker.keys import MasterKey, MasterKeys
from worker.keyspace import Names
from worker.session_admin import session_keys
from worker.sessions import open_record, seal_record

_BATCH = 100
_ATTEMPTS = 3
# Write ARGV[2] only while the key still holds ARGV[1]; keep its expiry.
_CAS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""
UNREADABLE = "unreadable"


class KekCounts(NamedTuple):
    """Live session records by the KEK id that seals them (``unreadable``: no clear
    ``kek`` field, so not a record this version wrote)."""

    total: int
    by_kek: dict[str, int]


class RotationReport(NamedTuple):
    """What ``rotate-master`` did, and what is left."""

    active: str
    examined: int
    resealed: int
    already_active: int
    gone: int
    failed: int
    remaining: KekCounts
    removable: list[str]


def kek_of(raw: bytes) -> str | None:
    """The clear ``kek`` id of a sealed record, or None if it is not a record."""
    try:
        outer = loads(raw, "e")
    except DecodeError:
        return None
    kek = outer.get("kek") if isinstance(outer, dict) else None
    return kek if isinstance(kek, str) else None


async def compare_and_set(redis: aioredis.Redis, key: str, expected: bytes, new: bytes) -> bool:
    """Replace ``key``'s value with ``new`` iff it is still ``expected``; keep its TTL."""
    return bool(await redis.eval(_CAS, 1, key, expected, new))


async def kek_status(redis: aioredis.Redis, *, prefix: str = "sealstream") -> KekCounts:
    """Count live session records per KEK id (opens nothing, needs no key)."""
    counts: Counter[str] = Counter()
    async for batch in session_keys(redis, Names(prefix)):
        async with redis.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.get(key)
            values: list[Any] = await pipe.execute()
        for raw in values:
            if raw is not None:
                counts[kek_of(bytes(raw)) or UNREADABLE] += 1
    by_kek = dict(sorted(counts.items()))
    return KekCounts(total=sum(by_kek.values()), by_kek=by_kek)


def _reseal(key: str, raw: bytes, names: Names, keys: MasterKeys) -> bytes | None:
    """The record re-sealed under the active KEK; None if it does not open."""
    sid = names.sid_of_session_key(key)
    if sid is None:
        return None
    try:
        return seal_record(open_record(sid, raw, keys), keys.active)
    except DecryptError:
        return None


async def rotate_master(
    redis: aioredis.Redis,
    keys: MasterKeys,
    *,
    prefix: str = "sealstream",
    progress: Callable[[int, int], None] | None = None,
) -> RotationReport:
    """Re-seal every live session record under ``keys.active``.

    ``progress(done, total)`` is called after each batch. A record that fails to
    open (sealed under a KEK not in ``keys``, or tampered with) is counted in
    ``failed`` and left as it is. ``removable`` lists the ring's older KEK ids that
    no live record uses at the end (a fresh count, so sessions created meanwhile by
    workers still sealing under an older KEK keep it listed as in use).
    """
    names = Names(prefix)
    all_keys = [k async for batch in session_keys(redis, names) for k in batch]
    tally: Counter[str] = Counter()
    done = 0
    for start in range(0, len(all_keys), _BATCH):
        batch = all_keys[start : start + _BATCH]
        for _ in range(_ATTEMPTS):
            batch = await _rotate_batch(redis, batch, names, keys, tally)
            if not batch:
                break
        tally["failed"] += len(batch)  # still losing the race after every attempt
        done += len(all_keys[start : start + _BATCH])
        if progress is not None:
            progress(done, len(all_keys))
    remaining = await kek_status(redis, prefix=prefix)
    removable = [i for i in keys.ids[1:] if remaining.by_kek.get(i, 0) == 0]
    return RotationReport(
        active=keys.active.id,
        examined=len(all_keys),
        resealed=tally["resealed"],
        already_active=tally["already_active"],
        gone=tally["gone"],
        failed=tally["failed"],
        remaining=remaining,
        removable=removable,
    )


async def _rotate_batch(
    redis: aioredis.Redis,
    batch: list[str],
    names: Names,
    keys: MasterKeys,
    tally: Counter[str],
) -> list[str]:
    """Re-seal one batch; return the keys whose compare-and-set lost a race."""
    async with redis.pipeline(transaction=False) as pipe:
        for key in batch:
            pipe.get(key)
        values: list[Any] = await pipe.execute()
    todo: list[tuple[str, bytes]] = []
    for key, raw in zip(batch, values, strict=True):
        if raw is None:
            tally["gone"] += 1
        elif kek_of(bytes(raw)) == keys.active.id:
            tally["already_active"] += 1
        else:
            todo.append((key, bytes(raw)))

    def reseal_all() -> list[bytes | None]:
        # Loading RSA keys and sealing: off the event loop, once per batch.
        return [_reseal(key, raw, names, keys) for key, raw in todo]

    sealed = await anyio.to_thread.run_sync(reseal_all)
    writes = [(key, raw, new) for (key, raw), new in zip(todo, sealed, strict=True) if new]
    tally["failed"] += len(todo) - len(writes)
    async with redis.pipeline(transaction=False) as pipe:
        for key, raw, new in writes:
            # By name: a cluster pipeline refuses pipe.eval (its keys share the sid slot).
            pipe.execute_command("EVAL", _CAS, 1, key, raw, new)
        written: list[Any] = await pipe.execute() if writes else []
    tally["resealed"] += sum(1 for ok in written if ok)
    return [key for (key, _, _), ok in zip(writes, written, strict=True) if not ok]


def write_new_master_key(path: Path) -> MasterKey:
    """Write a fresh master key (one base64 line, mode 0600) to a new file ``path``.

    Refuses to overwrite. Returns the key (print only its ``id``).
    """
    key = MasterKey.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"--out: cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.to_base64() + "\n")
    return key
