"""Dead letters in ``P:dlq``: browse, count and purge them, never decrypting.

A dead letter's original field (``e`` or ``j``) is still encrypted; it is only ever
shown as its size and a short hex prefix. There is no requeue: a dead-lettered
envelope added again is a replay (its ``mid`` is spent) or expired (its ``ts`` is
past the window) by design, so a client retries with a new message id.

Counting and purging run server-side in a Lua script over chunks of the stream,
so the (up to 64 KiB) original fields never cross the network and Redis is never
blocked for long.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from worker.errors import InvalidArgument
from worker.keyspace import Names

#: Dead-letter reasons of protocol revision 2.
REASONS = (
    "malformed",
    "unsupported",
    "session_invalid",
    "auth_failed",
    "replay",
    "expired",
    "handler_error",
    "timeout",
    "delivery_limit",
    "unanswerable",
)
_CHUNK = 256
_ID = re.compile(r"\A[0-9]{1,20}-[0-9]{1,20}\Z")
_DURATION = re.compile(r"\A([0-9]{1,9})([smhd])\Z")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

# One chunk: entries after ARGV[1] (exclusive, or '-') up to ARGV[2], at most
# ARGV[3]; those whose reason is ARGV[4] ('' = any) are counted and, if ARGV[5] is
# '1', deleted. Returns {last id seen, rows read, reason, count, reason, count, ...}.
_CHUNK_SCRIPT = """
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
local counts, last = {}, ''
for _, row in ipairs(rows) do
  last = row[1]
  local f, reason = row[2], '?'
  for i = 1, #f, 2 do
    if f[i] == 'reason' then reason = f[i + 1] break end
  end
  if ARGV[4] == '' or reason == ARGV[4] then
    if ARGV[5] == '1' then redis.call('XDEL', KEYS[1], row[1]) end
    counts[reason] = (counts[reason] or 0) + 1
  end
end
local out = {last, #rows}
for r, n in pairs(counts) do
  out[#out + 1] = r
  out[#out + 1] = n
end
return out
"""


class Original(NamedTuple):
    """The still-encrypted original field of a dead letter, described, never shown."""

    field: str
    size: int
    prefix_hex: str


class DeadLetter(NamedTuple):
    """One dead letter as an operator sees it (no ciphertext beyond a hex prefix)."""

    id: str
    added_ms: int
    reason: str | None
    stream: str | None
    entry_id: str | None
    sid: str | None
    mid: str | None
    type: str | None
    attempts: int | None
    at_ms: int | None
    worker: str | None
    original: Original | None
    size: int | None

    def to_json(self) -> dict[str, Any]:
        """The letter as a JSON object (the schema in the README)."""
        out: dict[str, Any] = {
            "id": self.id,
            "added_at_ms": self.added_ms,
            "reason": self.reason,
            "stream": self.stream,
            "entry_id": self.entry_id,
            "sid": self.sid,
            "mid": self.mid,
            "type": self.type,
            "attempts": self.attempts,
            "at_ms": self.at_ms,
            "worker": self.worker,
            "original": self.original._asdict() if self.original else None,
            "size": self.size,
        }
        return out


class ReasonCounts(NamedTuple):
    """Dead letters matched, in all and by reason."""

    total: int
    by_reason: dict[str, int]


class Filter(NamedTuple):
    """Which dead letters a command touches: a reason and/or added before a time."""

    reason: str | None = None
    before_ms: int | None = None

    @property
    def end(self) -> str:
        """The XRANGE end bound: ids strictly before ``before_ms``, or ``+``."""
        return "+" if self.before_ms is None else f"({self.before_ms}-0"


#: Every dead letter.
ANY = Filter()


def check_reason(reason: str | None) -> str | None:
    """``reason`` if it is a protocol dead-letter reason; :class:`InvalidArgument` otherwise."""
    if reason is not None and reason not in REASONS:
        raise InvalidArgument(f"--reason: expected one of {', '.join(REASONS)}")
    return reason


def check_id(entry_id: str) -> str:
    """A stream entry id ``<ms>-<seq>``; :class:`InvalidArgument` otherwise."""
    if not _ID.match(entry_id):
        raise InvalidArgument("ID: expected a stream entry id such as 1764547200000-0")
    return entry_id


def parse_before(text: str, *, now_ms: int) -> int:
    """``--before``: a duration ago (``90s``, ``30m``, ``12h``, ``7d``), an ISO 8601 time
    (UTC unless it says otherwise) or milliseconds since the epoch. Returns epoch ms."""
    if m := _DURATION.match(text):
        return now_ms - int(m.group(1)) * _UNIT_MS[m.group(2)]
    if text.isdigit() and len(text) <= 15:
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            "--before: expected a duration (30m, 12h, 7d), an ISO 8601 time or epoch ms"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


async def server_time_ms(redis: aioredis.Redis) -> int:
    """Redis's clock (TIME), which also stamps stream entry ids, in ms."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def parse_letter(entry_id: str, fields: dict[bytes, bytes], *, prefix_bytes: int) -> DeadLetter:
    """A dead letter from its stream entry; the original field only described."""
    get = {k.decode("utf-8", "replace"): v for k, v in fields.items()}
    original = None
    for name in ("e", "j"):
        if name in get:
            raw = get[name]
            original = Original(field=name, size=len(raw), prefix_hex=raw[:prefix_bytes].hex())
            break
    return DeadLetter(
        id=entry_id,
        added_ms=int(entry_id.split("-", 1)[0]),
        reason=_text(get.get("reason")),
        stream=_text(get.get("stream")),
        entry_id=_text(get.get("id")),
        sid=_text(get.get("sid")),
        mid=_text(get.get("mid")),
        type=_text(get.get("type")),
        attempts=_int(get.get("attempts")),
        at_ms=_int(get.get("at")),
        worker=_text(get.get("worker")),
        original=original,
        size=_int(get.get("size")),
    )


async def list_letters(
    redis: aioredis.Redis,
    *,
    prefix: str = "sealstream",
    limit: int = 20,
    where: Filter = ANY,
    prefix_bytes: int = 8,
) -> list[DeadLetter]:
    """The newest ``limit`` dead letters matching ``where``, newest first."""
    key, end = Names(prefix).dlq, where.end
    out: list[DeadLetter] = []
    while len(out) < limit:
        rows = await redis.xrevrange(key, max=end, min="-", count=max(limit, 100))
        for raw_id, fields in rows:
            letter = parse_letter(_text(raw_id) or "", dict(fields), prefix_bytes=prefix_bytes)
            if where.reason is None or letter.reason == where.reason:
                out.append(letter)
                if len(out) >= limit:
                    break
        if len(rows) < max(limit, 100):
            break
        end = f"({_text(rows[-1][0])}"
    return out


async def show_letter(
    redis: aioredis.Redis, entry_id: str, *, prefix: str = "sealstream", prefix_bytes: int = 32
) -> DeadLetter | None:
    """One dead letter by its id in ``P:dlq``, or None."""
    check_id(entry_id)
    rows = await redis.xrange(Names(prefix).dlq, min=entry_id, max=entry_id, count=1)
    if not rows:
        return None
    return parse_letter(entry_id, dict(rows[0][1]), prefix_bytes=prefix_bytes)


async def _sweep(
    redis: aioredis.Redis, prefix: str, where: Filter, *, delete: bool
) -> ReasonCounts:
    key, start = Names(prefix).dlq, "-"
    counts: Counter[str] = Counter()
    while True:
        raw = await redis.eval(
            _CHUNK_SCRIPT,
            1,
            key,
            start,
            where.end,
            _CHUNK,
            where.reason or "",
            "1" if delete else "0",
        )
        last, read = _text(raw[0]) or "", int(raw[1])
        for i in range(2, len(raw), 2):
            counts[_text(raw[i]) or "?"] += int(raw[i + 1])
        if read < _CHUNK:
            break
        start = f"({last}"
    by_reason = dict(sorted(counts.items()))
    return ReasonCounts(total=sum(by_reason.values()), by_reason=by_reason)


async def count_letters(
    redis: aioredis.Redis, *, prefix: str = "sealstream", where: Filter = ANY
) -> ReasonCounts:
    """Count the dead letters matching ``where``, by reason."""
    return await _sweep(redis, prefix, where, delete=False)


async def purge_letters(
    redis: aioredis.Redis, *, prefix: str = "sealstream", where: Filter = ANY
) -> ReasonCounts:
    """Delete the dead letters matching ``where``; return what was deleted, by reason.

    Letters added while the purge runs are kept unless they match and lie behind
    it; the purge never touches anything but ``P:dlq``.
    """
    return await _sweep(redis, prefix, where, delete=True)
