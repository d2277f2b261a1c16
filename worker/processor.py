"""One stream entry through the protocol: the worker's data path.

entry -> wire.decode_request -> session -> messages.open_request -> replay record ->
handler -> messages.seal_reply -> wire.encode_reply -> reply stream -> XACK.

Every refusal sends a notice (when ``sid`` and ``mid`` are well formed), writes a
dead letter, then acknowledges. Nothing here ever raises for bad input.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from worker import messages, wire
from worker.envelope import (
    ALG_RSA,
    handshake_session_key,
    x25519_keypair,
    x25519_shared,
)
from worker.errors import (
    AuthFailed,
    BadPayload,
    DecryptError,
    DeliveryLimit,
    Expired,
    HandlerEscaped,
    Malformed,
    ProtocolError,
    Replay,
    SessionExists,
    SessionInvalid,
)
from worker.handlers import App, Context, HandlerSpec
from worker.keys import MasterKeys, ServiceKey
from worker.logging import get_logger
from worker.metrics import Metrics
from worker.payloads import to_value
from worker.sessions import DEFAULT_TTL_S, Session, clamp_ttl, new_session, open_record, seal_record
from worker.settings import Settings
from worker.streams import Entry, Retrier, Store

log = get_logger("sealstream.worker")
Clock = Callable[[], int]
_SEEN_MIN_MS = 600_000
_SEEN_MARGIN_MS = 60_000


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """An entry handed to the processor, with its shard and delivery count."""

    shard: int
    entry: Entry
    attempts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What a dispatched request ends in: a status, its plaintext, maybe a dead letter."""

    status: str
    plaintext: bytes
    dead_letter: str | None = None
    code: str | None = None


class SessionCache:
    """Opened sessions by sid, valid only while the stored record bytes are the same."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._items: OrderedDict[str, tuple[bytes, Session]] = OrderedDict()

    def open(self, sid: str, raw: bytes, keks: MasterKeys) -> Session:
        """The session for this record (cached); DecryptError when it fails to open."""
        hit = self._items.get(sid)
        if hit is not None and hit[0] == raw:
            self._items.move_to_end(sid)
            return hit[1]
        session = open_record(sid, raw, keks)
        self._items[sid] = (raw, session)
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return session


class Stats:
    """Counters for one worker process."""

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.refused = 0
        self.redelivered_done = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        return {
            "ok": self.ok,
            "error": self.error,
            "refused": self.refused,
            "redelivered_done": self.redelivered_done,
        }


class Processor:
    """Runs one delivery through the protocol. Safe to call concurrently."""

    def __init__(
        self,
        *,
        store: Store,
        app: App,
        settings: Settings,
        service_keys: dict[str, ServiceKey],
        master_keys: MasterKeys,
        consumer: str,
        clock: Clock = wall_clock_ms,
        retry: Retrier | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.retry = retry or Retrier()
        self.metrics = metrics or Metrics()
        self.app = app
        self.settings = settings
        self.service_keys = service_keys
        self.master_keys = master_keys
        self.consumer = consumer
        self.clock = clock
        self.sessions = SessionCache()
        self.stats = Stats()

    async def process(self, d: Delivery) -> None:
        """Process one delivery to its end: a reply or a dead letter, then XACK."""
        with structlog.contextvars.bound_contextvars(entry_id=d.entry.id, shard=d.shard):
            request: wire.Request | None = None
            try:
                try:
                    request = _decode(d.entry.fields, self.settings.max_entry_size)
                except ProtocolError as exc:
                    if d.attempts > self.settings.delivery_limit:
                        raise _with_context(
                            DeliveryLimit("delivered too many times"), exc
                        ) from None
                    raise
                if d.attempts > self.settings.delivery_limit:
                    raise DeliveryLimit("delivered too many times")
                structlog.contextvars.bind_contextvars(
                    session_id=request.sid, message_id=request.mid, type=request.type
                )
                self._check_fresh(request, d.entry.id)
                if request.is_handshake:
                    await self._handshake(d, request)
                else:
                    await self._request(d, request)
            except ProtocolError as exc:
                if request is not None:
                    _fill_context(exc, request)
                await self._refuse(d, exc)
            finally:
                structlog.contextvars.unbind_contextvars("session_id", "message_id", "type")

    # -- the two paths ---------------------------------------------------------------

    def _check_fresh(self, request: wire.Request, entry_id: str) -> None:
        added_ms = int(entry_id.split("-", 1)[0])
        if abs(request.ts - added_ms) > self.settings.replay_window_ms:
            raise Expired("ts is outside the freshness window")

    async def _request(self, d: Delivery, request: wire.Request) -> None:
        raw = await self.retry(lambda: self.store.get_session(request.sid))
        if raw is None:
            raise SessionInvalid("no session")
        try:
            session = self.sessions.open(request.sid, raw, self.master_keys)
        except DecryptError:
            # No traceback: it would carry the crypto library's text.
            log.error("session_record_invalid", alarm="tamper")  # noqa: TRY400
            raise SessionInvalid("the session record failed to open") from None
        if session.expired(self.clock()):
            raise SessionInvalid("the session has expired")
        if request.alg == ALG_RSA:
            if len(request.encrypted_aes_key or b"") != session.wrapped_key_size:
                raise Malformed("encryptedAesKey is not the session modulus size")
            opened = await anyio.to_thread.run_sync(_open, request, session.private_key, None)
        else:
            opened = _open(request, None, session.ks)
        if not await self._claim_mid(d, request):
            return
        outcome = await self._dispatch(d, request, opened.plaintext)
        reply = messages.seal_reply(request, opened.reply_key, outcome.status, outcome.plaintext)
        await self._finish(d, request, reply, outcome)

    async def _handshake(self, d: Delivery, request: wire.Request) -> None:
        service = self.service_keys.get(request.kid or "")
        if service is None:
            raise AuthFailed("unknown kid")
        if len(request.encrypted_aes_key or b"") != service.wrapped_key_size:
            raise Malformed("encryptedAesKey is not the service modulus size")
        opened = await anyio.to_thread.run_sync(_open, request, service.private_key, None)
        if not await self._claim_mid(d, request):
            return
        if await self.retry(lambda: self.store.session_exists(request.sid)):
            raise SessionExists("a session already exists for this sid")
        try:
            ec, ttl = _handshake_payload(wire.loads(opened.plaintext, request.field), request.field)
            ew_private, ew = x25519_keypair()
            shared = x25519_shared(ew_private, ec)
        except (wire.DecodeError, BadPayload, ValueError) as exc:
            message = exc.message if isinstance(exc, BadPayload) else "invalid handshake payload"
            outcome = _error("bad_payload", message, request.field)
            reply = messages.seal_reply(request, opened.reply_key, "error", outcome.plaintext)
            await self._finish(d, request, reply, outcome)
            return
        ks = handshake_session_key(
            kb=opened.reply_key,
            shared=shared,
            sid=request.sid,
            client_ephemeral=ec,
            worker_ephemeral=ew,
        )
        session = await anyio.to_thread.run_sync(
            lambda: new_session(
                request.sid,
                ks=ks,
                now_ms=self.clock(),
                ttl_s=ttl,
                bits=self.settings.session_key_bits,
            )
        )
        body = {
            "sessionId": request.sid,
            "publicKey": session.public_pem,
            "serverEphemeral": wire.to_wire_binary(ew, request.field),
            "expiresAt": session.expires,
        }
        outcome = Outcome(status="ok", plaintext=wire.dumps(body, request.field))
        reply = messages.seal_reply(request, opened.reply_key, "ok", outcome.plaintext)
        await self._finish(d, request, reply, outcome, session=session)

    # -- steps -----------------------------------------------------------------------

    async def _claim_mid(self, d: Delivery, request: wire.Request) -> bool:
        """Set the replay record; False when this entry was already answered."""
        now = self.clock()
        # The record must outlive the handler's every attempt: the reply is added
        # only while it is still this entry's.
        spec = self.app.get(request.type)
        budget_ms = 0 if spec is None else self._timeout_s(spec) * (spec.retries + 1) * 1000
        ttl = max(
            request.ts + self.settings.replay_window_ms + _SEEN_MARGIN_MS - now,
            _SEEN_MIN_MS,
            math.ceil(budget_ms) + _SEEN_MARGIN_MS,
        )
        prev = await self.retry(
            lambda: self.store.mark_seen(request.sid, request.mid, d.entry.id, ttl_ms=ttl)
        )
        if prev is None:
            return True
        owner, _, state = prev.partition("|")
        if owner != d.entry.id:
            raise Replay("the mid was already used by another entry")
        if state == "done":
            log.info("redelivery_already_answered")
            self.stats.redelivered_done += 1
            self.metrics.redelivered_done.inc()
            await self.retry(lambda: self.store.ack(d.shard, d.entry.id))
            return False
        log.info("redelivery")
        return True

    def _timeout_s(self, spec: HandlerSpec) -> float:
        return spec.timeout_s if spec.timeout_s is not None else self.settings.handler_timeout_s

    async def _dispatch(self, d: Delivery, request: wire.Request, plaintext: bytes) -> Outcome:
        field = request.field
        spec = self.app.get(request.type)
        if spec is None:
            return _error("unknown_type", f"no handler for type {request.type!r}", field)
        try:
            payload = wire.loads(plaintext, field)
        except wire.DecodeError:
            return _error("bad_payload", "the payload is not a single strict value", field)
        timeout = self._timeout_s(spec)
        outcome = _error("handler_error", "the handler failed", field, dead_letter="handler_error")
        for attempt in range(1, spec.retries + 2):
            ctx = Context(
                session_id=request.sid,
                message_id=request.mid,
                type=request.type,
                ts=request.ts,
                entry_id=d.entry.id,
                attempt=attempt,
            )
            started = time.perf_counter()
            try:
                with anyio.fail_after(timeout):
                    try:
                        result = await _call(spec, payload, ctx)
                    finally:
                        self.metrics.handler_seconds.labels(type=spec.name).observe(
                            time.perf_counter() - started
                        )
            except BadPayload as exc:
                return _error("bad_payload", exc.message, field)
            except TimeoutError:
                log.warning("handler_timeout", attempt=attempt, timeout_s=timeout)
                outcome = _error(
                    "timeout",
                    f"the handler timed out after {timeout:g} s",
                    field,
                    dead_letter="timeout",
                )
                continue
            except Exception as exc:
                # The exception text may quote the payload: log its type only.
                error_type = str(exc) if isinstance(exc, HandlerEscaped) else type(exc).__name__
                log.warning("handler_failed", attempt=attempt, error_type=error_type)
                outcome = _error(
                    "handler_error", "the handler failed", field, dead_letter="handler_error"
                )
                continue
            try:
                body = wire.dumps(result, field)
            except (TypeError, ValueError, OverflowError):
                log.warning("handler_result_unencodable", encoding=field)
                return _error(
                    "handler_error",
                    "the handler's result cannot be encoded",
                    field,
                    dead_letter="handler_error",
                )
            log.debug("handler_done", ms=round((time.perf_counter() - started) * 1000, 2))
            return Outcome(status="ok", plaintext=body)
        return outcome

    async def _finish(
        self,
        d: Delivery,
        request: wire.Request,
        reply: wire.Reply,
        outcome: Outcome,
        *,
        session: Session | None = None,
    ) -> None:
        """Dead-letter, write the reply atomically with the replay record, then XACK.

        The dead letter goes first: a crash before the reply then repeats it on the
        redelivery instead of losing it (the reply marks the record ``done``).
        """
        record = seal_record(session, self.master_keys.active) if session is not None else None
        entry = wire.encode_reply(reply)
        if outcome.dead_letter is not None:
            letter = self._dead_letter_fields(d, outcome.dead_letter, request)
            await self.retry(lambda: self.store.dead_letter(letter))
        written = await self.retry(
            lambda: self.store.add_reply(
                request.sid,
                request.mid,
                d.entry.id,
                entry,
                fallback_ttl_ms=2 * self.settings.replay_window_ms,
                seen_ttl_ms=_SEEN_MIN_MS,
                session_record=record,
                session_expires_at_ms=session.expires if session is not None else None,
            )
        )
        if written == -1:
            raise SessionExists("a session already exists for this sid")
        if written == 0:
            log.info("reply_already_written")
            await self.retry(lambda: self.store.ack(d.shard, d.entry.id))
            return
        await self.retry(lambda: self.store.ack(d.shard, d.entry.id))
        known = request.is_handshake or self.app.get(request.type) is not None
        self.metrics.requests.labels(
            type=request.type if known else "unknown", status=outcome.status
        ).inc()
        if outcome.status == "ok":
            self.stats.ok += 1
            log.info("request_done", status="ok", attempts=d.attempts)
        else:
            self.stats.error += 1
            log.info("request_done", status="error", code=outcome.code, attempts=d.attempts)

    async def _refuse(self, d: Delivery, exc: ProtocolError) -> None:
        """Notice (when ids are well formed), dead letter, XACK. Logged, never raised."""
        if exc.session_id and exc.message_id and exc.field in wire.FIELDS:
            field: wire.Field = "e" if exc.field == "e" else "j"
            note = messages.notice(
                field=field, sid=exc.session_id, mid=exc.message_id, code=exc.notice, alg=exc.alg
            )
            sid, entry = exc.session_id, wire.encode_reply(note)
            await self.retry(
                lambda: self.store.add_notice(
                    sid, entry, fallback_ttl_ms=2 * self.settings.replay_window_ms
                )
            )
        letter = self._dead_letter_fields(d, exc.reason, None, exc)
        await self.retry(lambda: self.store.dead_letter(letter))
        await self.retry(lambda: self.store.ack(d.shard, d.entry.id))
        self.stats.refused += 1
        self.metrics.refused.labels(reason=exc.reason).inc()
        log.warning(
            "request_refused",
            reason=exc.reason,
            notice=exc.notice,
            detail=exc.detail,
            session_id=exc.session_id,
            message_id=exc.message_id,
        )

    def _dead_letter_fields(
        self,
        d: Delivery,
        reason: str,
        request: wire.Request | None,
        exc: ProtocolError | None = None,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "reason": reason,
            "stream": self.store.names.request_stream(d.shard),
            "id": d.entry.id,
        }
        sid = request.sid if request else exc.session_id if exc else None
        mid = request.mid if request else exc.message_id if exc else None
        type_ = request.type if request else exc.type if exc else None
        for name, value in (("sid", sid), ("mid", mid), ("type", type_)):
            if value:
                fields[name] = value
        fields.update(attempts=d.attempts, at=self.clock(), worker=self.consumer)
        field = wire.entry_field(d.entry.fields)
        if (exc is None or exc.keep_original) and field is not None:
            fields[field] = d.entry.fields[field.encode()]
        else:
            fields["size"] = wire.entry_size(d.entry.fields)
        return fields


def _decode(fields: dict[bytes, bytes], max_size: int) -> wire.Request:
    """Decode; any unexpected failure is Malformed, so no input bypasses the
    notice/dead-letter path (it would stay pending and block trimming)."""
    try:
        return wire.decode_request(fields, max_size=max_size)
    except ProtocolError:
        raise
    except Exception as exc:
        log.error("decode_bug", error_type=type(exc).__name__)  # noqa: TRY400
        raise Malformed("the entry could not be decoded") from None


def _open(request: wire.Request, private_key: Any, ks: bytes | None) -> messages.Opened:
    try:
        return messages.open_request(request, private_key=private_key, ks=ks)
    except DecryptError:
        raise AuthFailed("authentication failed") from None


async def _call(spec: HandlerSpec, payload: Any, ctx: Context) -> Any:
    """Run the handler; what it raises is its own failure, never the worker's.

    ``SystemExit``/``KeyboardInterrupt`` raised by handler code, and a cancellation
    that nobody asked of this task (a handler awaiting a future someone cancelled),
    would otherwise stop the whole worker; they become :class:`HandlerEscaped`
    (a ``handler_error``). A real cancellation (timeout, shutdown) goes through.
    """
    if spec.convert is not None:
        payload = spec.convert(payload)  # BadPayload when it does not fit
    args = (payload, ctx) if spec.takes_context else (payload,)
    try:
        if spec.is_async:
            return to_value(await spec.fn(*args))
        return to_value(
            await anyio.to_thread.run_sync(lambda: spec.fn(*args), abandon_on_cancel=True)
        )
    except (SystemExit, KeyboardInterrupt) as exc:
        raise HandlerEscaped(type(exc).__name__) from None
    except anyio.get_cancelled_exc_class():
        if _cancel_requested():
            raise
        raise HandlerEscaped("CancelledError") from None


def _cancel_requested() -> bool:
    """Whether this task was asked to cancel (asyncio); elsewhere, assume it was."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return True
    return task is None or task.cancelling() > 0


def _error(
    code: str, message: str, field: wire.Field, *, dead_letter: str | None = None
) -> Outcome:
    body = wire.dumps({"code": code, "message": message}, field)
    return Outcome(status="error", plaintext=body, dead_letter=dead_letter, code=code)


def _handshake_payload(value: Any, field: wire.Field) -> tuple[bytes, int]:
    if not isinstance(value, dict) or "clientEphemeral" not in value:
        raise BadPayload("the handshake needs clientEphemeral")
    if not set(value) <= {"clientEphemeral", "ttl"}:
        raise BadPayload("unknown handshake fields")
    try:
        ec = wire.binary(value["clientEphemeral"], field)
    except wire.DecodeError:
        raise BadPayload("clientEphemeral is not binary") from None
    if len(ec) != 32:
        raise BadPayload("clientEphemeral must be 32 bytes")
    ttl = value.get("ttl", DEFAULT_TTL_S)
    if not wire.is_int(ttl):
        raise BadPayload("ttl must be an integer number of seconds")
    return ec, clamp_ttl(ttl)


def _fill_context(exc: ProtocolError, request: wire.Request) -> None:
    exc.session_id = exc.session_id or request.sid
    exc.message_id = exc.message_id or request.mid
    exc.field = exc.field or request.field
    exc.alg = exc.alg or request.alg
    exc.type = exc.type or request.type


def _with_context(new: ProtocolError, old: ProtocolError) -> ProtocolError:
    new.session_id, new.message_id, new.field = old.session_id, old.message_id, old.field
    new.alg, new.type, new.keep_original = old.alg, old.type, old.keep_original
    return new
