"""End-to-end refusals on a real Redis: each protocol rejection gets its notice (or
none), its dead letter and its XACK, and the worker goes on serving.

Every test ends by sending a good ``echo`` and waiting for its ``ok`` reply. Absence
is asserted only after the event that would have come after it: a worker writes a
notice before its dead letter and a dead letter before its XACK, so once the dead
letter (or the drained shard) is there, a missing notice (or dead letter) is final.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import anyio
import msgpack
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from tests.helpers import (
    Raw,
    Rig,
    handshake,
    new_id,
    now_ms,
    open_ok,
    serving,
    unknown_session,
)
from worker import codec, envelopes, wire
from worker.crypto import request_aad, seal
from worker.handlers import App
from worker.handshake import SessionGrant
from worker.keys import load_public_key
from worker.protocol import ALG_RSA, ALG_SK, HANDSHAKE_TYPE, KEY_SIZE
from worker.sessions import new_session, seal_record
from worker.settings import Settings
from worker.testing import ThrowawayKeys

#: Text the failing handler raises with; it must never reach a reply.
_LEAK = "exception text that must not leak 5f1c"
_BOTH: list[tuple[str, wire.Field]] = [(ALG_SK, "e"), (ALG_RSA, "j")]
_ENCODINGS: tuple[wire.Field, ...] = ("e", "j")
_LETTER_BASE = frozenset({"reason", "stream", "id", "attempts", "at", "worker"})


# -- the worker under test ------------------------------------------------------------


def _counting_app() -> tuple[App, Counter[str]]:
    """Handlers that count their calls: echo, count, boom (raises), slow (times out)."""
    calls: Counter[str] = Counter()
    app = App()

    @app.handler("echo")
    async def echo(payload: Any) -> Any:
        calls["echo"] += 1
        return payload

    @app.handler("count")
    async def count(payload: Any) -> Any:
        calls["count"] += 1
        return {"counted": calls["count"]}

    @app.handler("boom")
    async def boom(payload: Any) -> Any:
        calls["boom"] += 1
        raise RuntimeError(_LEAK)

    @app.handler("slow", timeout_s=0.2)
    async def slow(payload: Any) -> Any:
        calls["slow"] += 1
        await anyio.sleep(30)
        return payload

    return app, calls


def _serving(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> contextlib.AbstractAsyncContextManager[Rig]:
    """Run a worker with the counting app for the block."""
    app, calls = _counting_app()
    return serving(app, calls, settings, keys, redis)


@pytest.fixture
async def rig(settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis) -> AsyncIterator[Rig]:
    """A worker with the counting app, serving for the whole test."""
    async with _serving(settings, keys, redis) as running:
        yield running


@contextlib.contextmanager
def _case(label: str) -> Iterator[None]:
    """Name the variant in a failure from a loop over variants of one behaviour."""
    try:
        yield
    except (AssertionError, TimeoutError) as exc:
        exc.add_note(f"variant: {label}")
        raise


# -- building entries -----------------------------------------------------------------


def _flip(data: bytes, index: int = -1) -> bytes:
    """``data`` with one bit of one byte flipped."""
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _fields(request: wire.Request) -> dict[str, bytes]:
    """The stream entry of a request, with str field names (as send_fields takes)."""
    return {name: value for name, value in wire.encode_request(request).items()}


def _envelope(request: wire.Request) -> dict[str, Any]:
    """A request's envelope as a mutable map (binary as its encoding carries it)."""
    ((_, value),) = wire.encode_request(request).items()
    env = codec.loads(value, request.field)
    assert isinstance(env, dict)
    return env


def _pack(env: Any, field: wire.Field) -> dict[str, bytes]:
    """An entry holding ``env`` as given, bypassing the codec's own checks."""
    if field == "e":
        packed: bytes = msgpack.packb(env, use_bin_type=True)
        return {"e": packed}
    return {"j": json.dumps(env, separators=(",", ":")).encode()}


# -- reading what the worker wrote ---------------------------------------------------


async def _reply_envelopes(raw: Raw, sid: str) -> list[tuple[str, dict[str, Any]]]:
    """Every entry on ``sid``'s reply stream as (field name, decoded envelope)."""
    rows: Any = await raw.redis.xrange(raw.names.reply_stream(sid))
    out: list[tuple[str, dict[str, Any]]] = []
    for _, entry in rows:
        ((name, value),) = entry.items()
        field: wire.Field = "e" if name == b"e" else "j"
        env = codec.loads(value, field)
        assert isinstance(env, dict)
        out.append((name.decode(), env))
    return out


async def _notices(raw: Raw, sid: str, mid: str) -> list[tuple[str, dict[str, Any]]]:
    """The ``rejected`` notices for ``mid`` on ``sid``'s reply stream."""
    return [
        (name, env)
        for name, env in await _reply_envelopes(raw, sid)
        if env.get("mid") == mid and env.get("status") == "rejected"
    ]


async def _statuses(raw: Raw, sid: str, mid: str) -> list[str]:
    """The statuses of every reply to ``mid`` on ``sid``'s stream, in stream order."""
    return [env["status"] for _, env in await _reply_envelopes(raw, sid) if env.get("mid") == mid]


# -- assertions ----------------------------------------------------------------------


async def _assert_refused(
    rig: Rig,
    entry_id: str,
    fields: Mapping[str, bytes],
    *,
    reason: str,
    notice: str | None,
    sid: str | None = None,
    mid: str | None = None,
    type_: str | None = None,
    alg: str | None = None,
    watch: tuple[str, str] | None = None,
    original: bool = True,
    attempts: int | None = 1,
) -> dict[str, bytes]:
    """Check one refused entry end to end and return its dead letter.

    The dead letter carries exactly the protocol's fields (``sid``/``mid``/``type``
    as given, each only when expected; the original field byte for byte, or
    ``size``); the notice on ``watch`` (default ``(sid, mid)``) is exactly one
    ``rejected`` envelope with ``code`` = ``notice`` and ``alg`` only when given, in
    the request's encoding, or absent when ``notice`` is None; the entry is acked.
    """
    letter = await rig.raw.letter_for(entry_id)
    ids = {"sid": sid, "mid": mid, "type": type_}
    expected = set(_LETTER_BASE) | {name for name, value in ids.items() if value is not None}
    if original:
        ((field_name, field_value),) = fields.items()
        expected.add(field_name)
    else:
        expected.add("size")
    assert expected == set(letter)
    assert reason.encode() == letter["reason"]
    assert rig.stream.encode() == letter["stream"]
    assert entry_id.encode() == letter["id"]
    for name, value in ids.items():
        if value is not None:
            assert value.encode() == letter[name]
    if attempts is not None:
        assert str(attempts).encode() == letter["attempts"]
    assert int(entry_id.split("-")[0]) <= int(letter["at"]) <= now_ms()
    assert rig.worker.consumer.encode() == letter["worker"]
    if original:
        assert field_value == letter[field_name]
    else:
        size = sum(len(name.encode()) + len(value) for name, value in fields.items())
        assert str(size).encode() == letter["size"]

    # The acknowledgement comes last (on a cluster the dead letter is written before
    # the notice, in another slot): once it is in, the notice is there too.
    await rig.raw.wait_drained()
    watch = watch or ((sid, mid) if sid is not None and mid is not None else None)
    if notice is not None:
        assert watch is not None
        ((request_field, _),) = fields.items()
        notices = await _notices(rig.raw, *watch)
        assert 1 == len(notices)
        name, env = notices[0]
        keys = {"v", "sid", "mid", "status", "code"} | ({"alg"} if alg is not None else set())
        assert keys == set(env)
        assert request_field == name
        assert (1, *watch, "rejected", notice) == (
            env["v"],
            env["sid"],
            env["mid"],
            env["status"],
            env["code"],
        )
        assert alg == env.get("alg")
    elif watch is not None:
        assert [] == await _notices(rig.raw, *watch)

    await rig.raw.wait_drained()
    assert 0 == await rig.raw.pending()
    assert [letter] == await rig.raw.letters_for(entry_id)
    return letter


async def _send_refused(rig: Rig, request: wire.Request, **expected: Any) -> dict[str, bytes]:
    """Send ``request`` as it is and check it is refused (see :func:`_assert_refused`)."""
    fields = _fields(request)
    entry_id = await rig.raw.send_fields(fields)
    return await _assert_refused(rig, entry_id, fields, **expected)


async def _assert_serving(
    rig: Rig,
    grant: SessionGrant,
    *,
    alg: str = ALG_SK,
    field: wire.Field = "e",
    ts: int | None = None,
) -> None:
    """A good echo on ``grant``'s session still gets its ``ok`` reply, and is acked."""
    payload = {"still": "serving", "nonce": os.urandom(4).hex()}
    out = rig.raw.seal(grant, payload, alg=alg, field=field, ts=ts)
    await rig.raw.send(out.request)
    reply = await rig.raw.reply(grant.sid, out.request.mid)
    assert ("ok", alg, field) == (reply.status, reply.alg, reply.field)
    assert payload == open_ok(reply, out)
    await rig.raw.wait_drained()


def _error_body(reply: wire.Reply, out: envelopes.Outgoing) -> dict[str, Any]:
    """Authenticate an ``error`` reply and return its ``{code, message}``."""
    assert ("error", out.request.alg, out.request.field) == (reply.status, reply.alg, reply.field)
    body = open_ok(reply, out)
    assert isinstance(body, dict)
    assert {"code", "message"} == set(body)
    return body


# -- tampering, splicing, reflection, replay -----------------------------------------


def _tamper(request: wire.Request, name: str) -> wire.Request:
    """``request`` with field ``name`` changed after sealing (ts stays fresh)."""
    replace = dataclasses.replace
    if name == "iv":
        return replace(request, iv=_flip(request.iv))
    if name == "encryptedData":
        return replace(request, encrypted_data=_flip(request.encrypted_data, 0))
    if name == "authTag":
        return replace(request, auth_tag=_flip(request.auth_tag))
    if name == "encryptedAesKey":
        assert request.encrypted_aes_key is not None
        return replace(request, encrypted_aes_key=_flip(request.encrypted_aes_key))
    if name == "ts":
        return replace(request, ts=request.ts - 1)
    if name == "type":
        return replace(request, type="count")
    assert "mid" == name
    return replace(request, mid=new_id())


@pytest.mark.parametrize(
    "name", ["iv", "encryptedData", "authTag", "encryptedAesKey", "ts", "type", "mid"]
)
async def test_tampered_field_fails_authentication(rig: Rig, name: str) -> None:
    """A request with one field changed after sealing is auth_failed and runs no handler."""
    algs = [ALG_RSA] if name == "encryptedAesKey" else [ALG_SK, ALG_RSA]
    grant = await rig.raw.grant()
    for alg in algs:
        for field in _ENCODINGS:
            with _case(f"{alg} {field}"):
                out = rig.raw.seal(grant, {"pay": "load"}, alg=alg, field=field)
                bad = _tamper(out.request, name)
                await _send_refused(
                    rig,
                    bad,
                    reason="auth_failed",
                    notice="rejected",
                    sid=bad.sid,
                    mid=bad.mid,
                    type_=bad.type,
                    alg=alg,
                )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant)


@pytest.mark.parametrize("alg", [ALG_SK, ALG_RSA])
async def test_request_spliced_into_another_session(rig: Rig, alg: str) -> None:
    """A request sealed for session A with session B's sid is auth_failed."""
    a, b = await rig.raw.grant(), await rig.raw.grant()
    out = rig.raw.seal(a, {"for": "a"}, alg=alg)
    spliced = dataclasses.replace(out.request, sid=b.sid)
    await _send_refused(
        rig,
        spliced,
        reason="auth_failed",
        notice="rejected",
        sid=b.sid,
        mid=spliced.mid,
        type_="echo",
        alg=alg,
    )
    assert [] == await rig.raw.replies(a.sid)
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, a, alg=alg)
    await _assert_serving(rig, b, alg=alg)


async def test_reflected_reply_is_malformed(rig: Rig, redis: aioredis.Redis) -> None:
    """A worker's own ok reply added to a request shard is malformed, with a notice."""
    grant = await rig.raw.grant()
    for alg, field in _BOTH:
        with _case(f"{alg} {field}"):
            out = rig.raw.seal(grant, {"reflect": "me"}, alg=alg, field=field)
            await rig.raw.send(out.request)
            reply = await rig.raw.reply(grant.sid, out.request.mid)
            assert "ok" == reply.status
            rows: Any = await redis.xrange(rig.raw.names.reply_stream(grant.sid))
            (entry,) = [f for _, f in rows if wire.decode_reply(f).mid == out.request.mid]
            fields = {name.decode(): value for name, value in entry.items()}
            entry_id = await rig.raw.send_fields(fields)
            await _assert_refused(
                rig,
                entry_id,
                fields,
                reason="malformed",
                notice="rejected",
                sid=grant.sid,
                mid=out.request.mid,
                alg=alg,
            )
            assert ["ok", "rejected"] == await _statuses(rig.raw, grant.sid, out.request.mid)
    assert 2 == rig.calls["echo"]
    await _assert_serving(rig, grant)


async def test_replayed_entry_is_refused_and_not_run(rig: Rig, redis: aioredis.Redis) -> None:
    """The same request entry added again gets a replay notice and dead letter; it runs once."""
    grant = await rig.raw.grant()
    for alg, field in _BOTH:
        with _case(f"{alg} {field}"):
            before = rig.calls["count"]
            out = rig.raw.seal(grant, {}, alg=alg, field=field, type_="count")
            fields = _fields(out.request)
            first_id = await rig.raw.send_fields(fields)
            assert {"counted": before + 1} == open_ok(
                await rig.raw.reply(grant.sid, out.request.mid), out
            )
            entry_id = await rig.raw.send_fields(fields)
            await _assert_refused(
                rig,
                entry_id,
                fields,
                reason="replay",
                notice="replay",
                sid=grant.sid,
                mid=out.request.mid,
                type_="count",
                alg=alg,
            )
            assert before + 1 == rig.calls["count"]
            # The record still names the first entry, done, and lives >= 10 minutes.
            seen = rig.raw.names.seen(grant.sid, out.request.mid)
            assert f"0|{first_id}|done".encode() == await rig.raw.get(seen)
            assert 590_000 < await redis.pttl(seen)
            assert ["ok", "rejected"] == await _statuses(rig.raw, grant.sid, out.request.mid)
    await _assert_serving(rig, grant)


async def test_two_copies_added_at_once_run_once(rig: Rig, redis: aioredis.Redis) -> None:
    """Two copies of one request added back to back: one ok reply, one replay, one run."""
    grant = await rig.raw.grant()
    out = rig.raw.seal(grant, {}, type_="count")
    fields = _fields(out.request)
    entry: Any = dict(fields)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(rig.stream, entry)
        pipe.xadd(rig.stream, entry)
        added: Any = await pipe.execute()
    ids = {entry_id.decode() for entry_id in added}
    await rig.raw.reply_with(grant.sid, out.request.mid, "ok")
    (letter,) = await rig.raw.wait_dead_letters(1)
    loser = letter["id"].decode()
    assert loser in ids
    await _assert_refused(
        rig,
        loser,
        fields,
        reason="replay",
        notice="replay",
        sid=grant.sid,
        mid=out.request.mid,
        type_="count",
        alg=ALG_SK,
    )
    assert ["ok", "rejected"] == sorted(await _statuses(rig.raw, grant.sid, out.request.mid))
    assert 1 == rig.calls["count"]
    await _assert_serving(rig, grant)


async def test_refused_copy_does_not_burn_the_mid(rig: Rig, settings: Settings) -> None:
    """Copies refused before the replay step set no replay record; the genuine one still runs."""
    window = settings.replay_window_ms
    forgeries: list[tuple[str, Callable[[wire.Request], dict[str, bytes]], str]] = [
        ("flipped authTag", lambda r: _fields(_tamper(r, "authTag")), "auth_failed"),
        ("changed ts", lambda r: _fields(_tamper(r, "ts")), "auth_failed"),
        ("changed type", lambda r: _fields(_tamper(r, "type")), "auth_failed"),
        (
            "stale ts",
            lambda r: _fields(dataclasses.replace(r, ts=r.ts - window - 5_000)),
            "expired",
        ),
        ("unknown field", lambda r: _pack(_envelope(r) | {"x": 1}, r.field), "malformed"),
        (
            "short tag",
            lambda r: _fields(dataclasses.replace(r, auth_tag=r.auth_tag[:15])),
            "malformed",
        ),
    ]
    grant = await rig.raw.grant()
    for alg, field in _BOTH:
        out = rig.raw.seal(grant, {"genuine": alg}, alg=alg, field=field)
        seen = rig.raw.names.seen(grant.sid, out.request.mid)
        for label, forge, reason in forgeries:
            with _case(f"{label}, {alg} {field}"):
                entry_id = await rig.raw.send_fields(forge(out.request))
                assert reason.encode() == (await rig.raw.letter_for(entry_id))["reason"]
                assert await rig.raw.get(seen) is None
        await rig.raw.wait_drained()
        assert 0 == sum(rig.calls.values())
        await rig.raw.send(out.request)
        reply = await rig.raw.reply_with(grant.sid, out.request.mid, "ok")
        assert {"genuine": alg} == open_ok(reply, out)
        assert 1 == (await _statuses(rig.raw, grant.sid, out.request.mid)).count("ok")
        rig.calls.clear()
    await _assert_serving(rig, grant)


# -- freshness and sessions -----------------------------------------------------------


@pytest.mark.parametrize(("direction", "field"), [(-1, "e"), (1, "j")], ids=["past", "future"])
async def test_ts_outside_window_is_expired(
    rig: Rig,
    settings: Settings,
    direction: int,
    field: wire.Field,
) -> None:
    """A ts further than the window from the entry id's time gets expired, not run."""
    grant = await rig.raw.grant()
    ts = now_ms() + direction * (settings.replay_window_ms + 5_000)
    out = rig.raw.seal(grant, {}, ts=ts, field=field)
    await _send_refused(
        rig,
        out.request,
        reason="expired",
        notice="expired",
        sid=grant.sid,
        mid=out.request.mid,
        type_="echo",
        alg=ALG_SK,
    )
    assert 0 == sum(rig.calls.values())
    # Old but inside the window is still fresh.
    await _assert_serving(rig, grant, ts=now_ms() - settings.replay_window_ms + 10_000)


@pytest.mark.parametrize("ts", [-1, 0, 2**63], ids=["negative", "zero", "2^63"])
async def test_integer_ts_far_from_now_is_expired(rig: Rig, ts: int) -> None:
    """Any integer ts is well formed; one far from the entry id's time is expired."""
    grant = await rig.raw.grant()
    for field in _ENCODINGS:
        with _case(field):
            out = rig.raw.seal(grant, {}, ts=ts, field=field)
            await _send_refused(
                rig,
                out.request,
                reason="expired",
                notice="expired",
                sid=grant.sid,
                mid=out.request.mid,
                type_="echo",
                alg=ALG_SK,
            )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant)


async def test_wrapped_key_length_is_checked_after_the_session_record(
    rig: Rig,
    keys: ThrowawayKeys,
) -> None:
    """An empty encryptedAesKey for an unknown sid is session_unknown, as the order says."""
    ghost = unknown_session(keys)
    out = rig.raw.seal(ghost, {}, alg=ALG_RSA)
    bad = dataclasses.replace(out.request, encrypted_aes_key=b"")
    await _send_refused(
        rig,
        bad,
        reason="session_invalid",
        notice="session_unknown",
        sid=ghost.sid,
        mid=bad.mid,
        type_="echo",
        alg=ALG_RSA,
    )
    await _assert_serving(rig, await rig.raw.grant())


async def test_unknown_session_is_session_unknown(
    rig: Rig,
    settings: Settings,
    keys: ThrowawayKeys,
    redis: aioredis.Redis,
) -> None:
    """A well-formed request for a sid with no session gets session_unknown."""
    for alg, field in _BOTH:
        with _case(f"{alg} {field}"):
            ghost = unknown_session(keys)
            out = rig.raw.seal(ghost, {}, alg=alg, field=field)
            await _send_refused(
                rig,
                out.request,
                reason="session_invalid",
                notice="session_unknown",
                sid=ghost.sid,
                mid=out.request.mid,
                type_="echo",
                alg=alg,
            )
            # With no session, the reply stream expires after at most 2 x window.
            ttl = await redis.pttl(rig.raw.names.reply_stream(ghost.sid))
            assert 0 < ttl <= 2 * settings.replay_window_ms
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, await rig.raw.grant())


async def test_tampered_session_record_is_session_unknown(rig: Rig, redis: aioredis.Redis) -> None:
    """A session record with one byte flipped (even after use) is refused as session_unknown."""
    grant = await rig.raw.grant()
    await _assert_serving(rig, grant)  # the worker has now opened (and may cache) it
    key = rig.raw.names.session(grant.sid)
    record = await rig.raw.get(key)
    assert record is not None
    await redis.set(key, _flip(record, len(record) // 2), keepttl=True)
    for alg, field in _BOTH:
        with _case(f"{alg} {field}"):
            out = rig.raw.seal(grant, {}, alg=alg, field=field)
            await _send_refused(
                rig,
                out.request,
                reason="session_invalid",
                notice="session_unknown",
                sid=grant.sid,
                mid=out.request.mid,
                type_="echo",
                alg=alg,
            )
    assert 1 == rig.calls["echo"]
    await redis.set(key, record, keepttl=True)
    await _assert_serving(rig, grant)


async def test_session_record_under_another_sid_is_session_unknown(
    rig: Rig,
    redis: aioredis.Redis,
) -> None:
    """Session A's record copied to sid B's key does not open for B: session_unknown."""
    a = await rig.raw.grant()
    record = await rig.raw.get(rig.raw.names.session(a.sid))
    assert record is not None
    b = dataclasses.replace(a, sid=new_id())
    await redis.set(rig.raw.names.session(b.sid), record, px=600_000)
    out = rig.raw.seal(b, {})
    await _send_refused(
        rig,
        out.request,
        reason="session_invalid",
        notice="session_unknown",
        sid=b.sid,
        mid=out.request.mid,
        type_="echo",
        alg=ALG_SK,
    )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, a)


async def test_session_past_its_sealed_expiry_is_session_unknown(
    rig: Rig,
    keys: ThrowawayKeys,
    redis: aioredis.Redis,
) -> None:
    """A record whose sealed expiry has passed is refused even while Redis still holds it."""
    sid, ks, created = new_id(), os.urandom(KEY_SIZE), now_ms() - 7_200_000
    session = await anyio.to_thread.run_sync(
        lambda: new_session(sid, ks=ks, now_ms=created, ttl_s=3600)
    )
    record = seal_record(session, keys.master.active)
    await redis.set(rig.raw.names.session(sid), record, px=600_000)
    stale = SessionGrant(
        sid=sid, public_key_pem=session.public_pem, session_key=ks, expires_at=session.expires
    )
    out = rig.raw.seal(stale, {})
    await _send_refused(
        rig,
        out.request,
        reason="session_invalid",
        notice="session_unknown",
        sid=sid,
        mid=out.request.mid,
        type_="echo",
        alg=ALG_SK,
    )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, await rig.raw.grant())


# -- key wrapping ---------------------------------------------------------------------


_WRONG_WRAPS: dict[str, padding.AsymmetricPadding] = {
    "OAEP-SHA1": padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None
    ),
    "OAEP-SHA256 MGF1-SHA1": padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA256(), label=None
    ),
    "OAEP-SHA256 with a label": padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=b"x"
    ),
    "PKCS1v15": padding.PKCS1v15(),
}


async def test_key_wrapped_with_other_padding_fails_authentication(rig: Rig) -> None:
    """K wrapped with OAEP-SHA1 (Node's default) or any padding but OAEP-256 is auth_failed."""
    grant = await rig.raw.grant()
    public_key = load_public_key(grant.public_key_pem)
    for label, pad in _WRONG_WRAPS.items():
        with _case(label):
            k, mid, ts = os.urandom(KEY_SIZE), new_id(), now_ms()
            box = seal(k, codec.dumps({}, "e"), request_aad(ALG_RSA, grant.sid, mid, ts, "echo"))
            request = wire.Request(
                field="e",
                alg=ALG_RSA,
                sid=grant.sid,
                mid=mid,
                ts=ts,
                type="echo",
                iv=box.iv,
                encrypted_data=box.ciphertext,
                auth_tag=box.tag,
                encrypted_aes_key=public_key.encrypt(k, pad),
            )
            await _send_refused(
                rig,
                request,
                reason="auth_failed",
                notice="rejected",
                sid=grant.sid,
                mid=mid,
                type_="echo",
                alg=ALG_RSA,
            )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant, alg=ALG_RSA)


async def test_wrapped_key_of_wrong_length_is_malformed(rig: Rig, keys: ThrowawayKeys) -> None:
    """An encryptedAesKey not exactly the modulus size (session or service key) is malformed."""
    grant = await rig.raw.grant()
    for size in (255, 257, 512, 1, 0):
        with _case(f"{size} bytes"):
            out = rig.raw.seal(grant, {}, alg=ALG_RSA)
            wrapped = out.request.encrypted_aes_key
            assert wrapped is not None and 256 == len(wrapped)
            bad = dataclasses.replace(out.request, encrypted_aes_key=(wrapped * 2)[:size])
            fields = _fields(bad)
            entry_id = await rig.raw.send_fields(fields)
            await _assert_refused(
                rig,
                entry_id,
                fields,
                reason="malformed",
                notice="rejected",
                sid=grant.sid,
                mid=bad.mid,
                type_="echo",
                alg=ALG_RSA,
            )
    with _case("a handshake's wrapped Kb of 255 bytes"):
        hs = handshake(keys)
        wrapped = hs.request.encrypted_aes_key
        assert wrapped is not None
        bad = dataclasses.replace(hs.request, encrypted_aes_key=wrapped[1:])
        fields = _fields(bad)
        entry_id = await rig.raw.send_fields(fields)
        await _assert_refused(
            rig,
            entry_id,
            fields,
            reason="malformed",
            notice="rejected",
            sid=bad.sid,
            mid=bad.mid,
            type_=HANDSHAKE_TYPE,
            alg=ALG_RSA,
        )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant, alg=ALG_RSA)


# -- format: lengths, fields, values, version, alg ----------------------------------


@pytest.mark.parametrize(("name", "sizes"), [("authTag", [15, 17, 0]), ("iv", [16, 11, 0])])
async def test_wrong_iv_or_tag_length_is_malformed(rig: Rig, name: str, sizes: list[int]) -> None:
    """An authTag that is not 16 bytes or an iv that is not 12 is malformed, before crypto."""
    grant = await rig.raw.grant()
    for size in sizes:
        for alg, field in _BOTH:
            with _case(f"{size} bytes, {alg} {field}"):
                out = rig.raw.seal(grant, {}, alg=alg, field=field)
                value = (os.urandom(32))[:size]
                bad = (
                    dataclasses.replace(out.request, auth_tag=value)
                    if name == "authTag"
                    else dataclasses.replace(out.request, iv=value)
                )
                await _send_refused(
                    rig,
                    bad,
                    reason="malformed",
                    notice="rejected",
                    sid=grant.sid,
                    mid=bad.mid,
                    type_="echo",
                    alg=alg,
                )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant)


@pytest.mark.parametrize(
    ("label", "alg", "extra"),
    [
        ("unknown", ALG_SK, {"x": 1}),
        ("encryptedAesKey in SK mode", ALG_SK, {"encryptedAesKey": b"\x00" * 256}),
        ("kid outside a handshake", ALG_RSA, {"kid": "0" * 64}),
    ],
)
async def test_unknown_field_is_malformed(
    rig: Rig,
    label: str,
    alg: str,
    extra: dict[str, Any],
) -> None:
    """An envelope with a field its alg and type do not have is malformed."""
    grant = await rig.raw.grant()
    out = rig.raw.seal(grant, {}, alg=alg)
    env = _envelope(out.request) | extra
    fields = _pack(env, "e")
    entry_id = await rig.raw.send_fields(fields)
    await _assert_refused(
        rig,
        entry_id,
        fields,
        reason="malformed",
        notice="rejected",
        sid=grant.sid,
        mid=out.request.mid,
        type_="echo",
        alg=alg,
    )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant)


async def test_missing_field_is_malformed(rig: Rig, keys: ThrowawayKeys) -> None:
    """An envelope missing any required field is malformed (no notice without sid or mid)."""
    cases = [
        (ALG_SK, "ts"),
        (ALG_SK, "type"),
        (ALG_SK, "iv"),
        (ALG_SK, "encryptedData"),
        (ALG_SK, "authTag"),
        (ALG_RSA, "encryptedAesKey"),
        (ALG_SK, "sid"),
        (ALG_SK, "mid"),
    ]
    grant = await rig.raw.grant()
    for alg, name in cases:
        for field in _ENCODINGS:
            with _case(f"{name} {alg} {field}"):
                out = rig.raw.seal(grant, {}, alg=alg, field=field)
                env = _envelope(out.request)
                del env[name]
                fields = _pack(env, field)
                entry_id = await rig.raw.send_fields(fields)
                has_ids = name not in ("sid", "mid")
                await _assert_refused(
                    rig,
                    entry_id,
                    fields,
                    reason="malformed",
                    notice="rejected" if has_ids else None,
                    sid=grant.sid if name != "sid" else None,
                    mid=out.request.mid if name != "mid" else None,
                    type_="echo" if name != "type" else None,
                    alg=alg,
                    watch=(grant.sid, out.request.mid),
                )
    for field in _ENCODINGS:
        with _case(f"kid in a handshake, {field}"):
            hs = handshake(keys, field=field)
            env = _envelope(hs.request)
            del env["kid"]
            fields = _pack(env, field)
            entry_id = await rig.raw.send_fields(fields)
            await _assert_refused(
                rig,
                entry_id,
                fields,
                reason="malformed",
                notice="rejected",
                sid=hs.request.sid,
                mid=hs.request.mid,
                type_=HANDSHAKE_TYPE,
                alg=ALG_RSA,
            )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant)


def _set(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change that sets envelope field ``name`` to ``value``."""

    def change(env: dict[str, Any]) -> None:
        env[name] = value

    return change


def _b64_variant(kind: str) -> Callable[[dict[str, Any]], None]:
    """Re-encode authTag (16 bytes) as base64 that is not canonical."""

    def change(env: dict[str, Any]) -> None:
        tag = base64.b64decode(env["authTag"])
        text = base64.b64encode(tag).decode()
        if kind == "unpadded":
            env["authTag"] = text.rstrip("=")
        elif kind == "stray bits":  # 16 bytes: the last char before == carries 4 unused bits
            last = text[-3]
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
            env["authTag"] = text[:-3] + alphabet[alphabet.index(last) ^ 1] + "=="
        elif kind == "whitespace":
            env["authTag"] = text[:8] + "\n" + text[8:]
        else:
            assert "url-safe" == kind
            env["authTag"] = base64.urlsafe_b64encode(b"\xfb\xff" * 8).decode()

    return change


_ILL_FORMED: list[tuple[str, wire.Field, Callable[[dict[str, Any]], None], set[str]]] = [
    # (label, encoding, change, what stays well formed: of {"sid", "mid", "type"})
    ("ts as float", "e", lambda env: env.update(ts=float(env["ts"])), {"sid", "mid", "type"}),
    ("ts as bool", "j", _set("ts", True), {"sid", "mid", "type"}),
    ("ts as text", "j", lambda env: env.update(ts=str(env["ts"])), {"sid", "mid", "type"}),
    ("type with a space", "e", _set("type", "ec ho"), {"sid", "mid"}),
    ("type of 65 chars", "j", _set("type", "e" * 65), {"sid", "mid"}),
    ("sid in upper case", "e", lambda env: env.update(sid=env["sid"].upper()), {"mid", "type"}),
    ("mid of 31 chars", "j", lambda env: env.update(mid=env["mid"][:31]), {"sid", "type"}),
    (
        "iv as text in MessagePack",
        "e",
        lambda env: env.update(iv=env["iv"].hex()),
        {"sid", "mid", "type"},
    ),
    ("encryptedData as a number", "j", _set("encryptedData", 7), {"sid", "mid", "type"}),
    ("authTag unpadded base64", "j", _b64_variant("unpadded"), {"sid", "mid", "type"}),
    ("authTag base64 with stray bits", "j", _b64_variant("stray bits"), {"sid", "mid", "type"}),
    ("authTag base64 with a newline", "j", _b64_variant("whitespace"), {"sid", "mid", "type"}),
    ("authTag url-safe base64", "j", _b64_variant("url-safe"), {"sid", "mid", "type"}),
]


async def test_ill_formed_values_are_malformed(rig: Rig) -> None:
    """Ill-formed ts, type, ids or binary values are malformed; only well-formed ids are named."""
    grant = await rig.raw.grant()
    for label, field, change, kept in _ILL_FORMED:
        with _case(label):
            out = rig.raw.seal(grant, {}, field=field)
            env = _envelope(out.request)
            change(env)
            fields = _pack(env, field)
            entry_id = await rig.raw.send_fields(fields)
            notice = "rejected" if {"sid", "mid"} <= kept else None
            await _assert_refused(
                rig,
                entry_id,
                fields,
                reason="malformed",
                notice=notice,
                sid=env["sid"] if "sid" in kept else None,
                mid=env["mid"] if "mid" in kept else None,
                type_=env["type"] if "type" in kept else None,
                alg=ALG_SK,
                watch=(env["sid"], env["mid"]),
            )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant)


async def test_unsupported_version(rig: Rig) -> None:
    """``v`` other than 1 is unsupported; the notice (code rejected) names the known alg."""
    grant = await rig.raw.grant()
    for v, (alg, field) in zip((2, 0), _BOTH, strict=True):
        with _case(f"v={v}"):
            out = rig.raw.seal(grant, {}, alg=alg, field=field)
            fields = _pack(_envelope(out.request) | {"v": v}, field)
            entry_id = await rig.raw.send_fields(fields)
            await _assert_refused(
                rig,
                entry_id,
                fields,
                reason="unsupported",
                notice="rejected",
                sid=grant.sid,
                mid=out.request.mid,
                type_="echo",
                alg=alg,
            )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant)


async def test_unknown_alg_is_unsupported_and_notice_has_no_alg(rig: Rig) -> None:
    """An alg the worker does not know is unsupported; its notice carries no alg."""
    grant = await rig.raw.grant()
    unknown: list[tuple[str, wire.Field, str]] = [
        (ALG_RSA, "e", "RSA-OAEP+A256GCM"),
        (ALG_SK, "j", "sk+a256gcm"),
        (ALG_SK, "e", "none"),
    ]
    for base_alg, field, alg in unknown:
        with _case(alg):
            out = rig.raw.seal(grant, {}, alg=base_alg, field=field)
            fields = _pack(_envelope(out.request) | {"alg": alg}, field)
            entry_id = await rig.raw.send_fields(fields)
            await _assert_refused(
                rig,
                entry_id,
                fields,
                reason="unsupported",
                notice="rejected",
                sid=grant.sid,
                mid=out.request.mid,
                type_="echo",
                alg=None,
            )
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant)


# -- entries that do not decode ---------------------------------------------------------


def _padded_to(grant: SessionGrant, raw: Raw, size: int) -> tuple[envelopes.Outgoing, Any]:
    """An echo request whose MessagePack entry is exactly ``size`` bytes, and its payload."""
    n = size // 2
    for _ in range(3):
        payload = {"pad": "x" * n}
        out = raw.seal(grant, payload)
        total = sum(len(k) + len(v) for k, v in wire.encode_request(out.request).items())
        if total == size:
            return out, payload
        n += size - total
    raise AssertionError(f"cannot pad an entry to {size} bytes")


async def test_oversize_entry_is_dead_lettered_by_size_without_notice(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """An entry over max_entry_size gets a size-only dead letter, no notice; at the limit is ok."""
    small = dataclasses.replace(settings, max_entry_size=2048)
    async with _serving(small, keys, redis) as rig:
        grant = await rig.raw.grant()
        at_limit, payload = _padded_to(grant, rig.raw, 2048)
        await rig.raw.send(at_limit.request)
        reply = await rig.raw.reply(grant.sid, at_limit.request.mid)
        assert payload == open_ok(reply, at_limit)
        over, _ = _padded_to(grant, rig.raw, 2049)
        await _send_refused(
            rig,
            over.request,
            reason="malformed",
            notice=None,
            original=False,
            watch=(grant.sid, over.request.mid),
        )
        assert [] == await _statuses(rig.raw, grant.sid, over.request.mid)
        assert 1 == rig.calls["echo"]
        await _assert_serving(rig, grant)


def _garbage(case: str, grant: SessionGrant, raw: Raw) -> tuple[dict[str, bytes], bool, str]:
    """(entry, whether the dead letter keeps the original field, the mid inside if any)."""
    out = raw.seal(grant, {})
    mid = out.request.mid
    e = wire.encode_request(out.request)["e"]
    j = wire.encode_request(dataclasses.replace(out.request, field="j"))["j"]
    if case == "random bytes in e":
        return {"e": b"\xc1" + os.urandom(63)}, True, mid  # 0xc1 is never valid MessagePack
    if case == "not JSON in j":
        return {"j": b"this is {not JSON"}, True, mid
    if case == "invalid UTF-8 in j":
        return {"j": b'{"v":1,"x":"\xff"}'}, True, mid
    if case == "trailing bytes after a good e":
        return {"e": e + b"\x00"}, True, mid
    if case == "duplicate key in a good j":
        return {"j": j[:-1] + b',"mid":"' + mid.encode() + b'"}'}, True, mid
    if case == "an array in e":
        packed: bytes = msgpack.packb([1, 2, 3])
        return {"e": packed}, True, mid
    if case == "a non-string key in e":
        packed = msgpack.packb({"sid": grant.sid, "mid": mid, 1: 2})
        return {"e": packed}, True, mid
    if case == "two fields":
        return {"e": e, "j": j}, False, mid
    assert "a field named x" == case
    return {"x": e}, False, mid


@pytest.mark.parametrize(
    "case",
    [
        "random bytes in e",
        "not JSON in j",
        "invalid UTF-8 in j",
        "trailing bytes after a good e",
        "duplicate key in a good j",
        "an array in e",
        "a non-string key in e",
        "two fields",
        "a field named x",
    ],
)
async def test_garbage_entry_is_malformed_without_notice(rig: Rig, case: str) -> None:
    """An entry that does not decode to an envelope map is malformed, with no notice."""
    grant = await rig.raw.grant()
    fields, original, mid = _garbage(case, grant, rig.raw)
    entry_id = await rig.raw.send_fields(fields)
    await _assert_refused(
        rig,
        entry_id,
        fields,
        reason="malformed",
        notice=None,
        original=original,
        watch=(grant.sid, mid),
    )
    assert [] == await rig.raw.replies(grant.sid)
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant)


# -- handshakes -----------------------------------------------------------------------


async def test_handshake_with_unknown_kid_fails_authentication(
    rig: Rig,
    keys: ThrowawayKeys,
) -> None:
    """A handshake naming a kid the worker does not hold is auth_failed; no session is made."""
    kid = hashlib.sha256(os.urandom(16)).hexdigest()
    out = handshake(keys, kid=kid)
    await _send_refused(
        rig,
        out.request,
        reason="auth_failed",
        notice="rejected",
        sid=out.request.sid,
        mid=out.request.mid,
        type_=HANDSHAKE_TYPE,
        alg=ALG_RSA,
    )
    assert await rig.raw.get(rig.raw.names.session(out.request.sid)) is None
    good = handshake(keys)
    await rig.raw.send(good.request)
    # Key generation runs at the lowest priority: on a busy machine it waits for spare CPU.
    reply = await rig.raw.reply(good.request.sid, good.request.mid, timeout=30)
    assert good.request.sid == open_ok(reply, good)["sessionId"]
    await _assert_serving(rig, await rig.raw.grant())


async def test_handshake_for_existing_sid_is_refused_and_spends_mid(
    rig: Rig,
    keys: ThrowawayKeys,
) -> None:
    """An authentic handshake for a sid with a session is session_invalid and spends its mid."""
    grant = await rig.raw.grant()
    key = rig.raw.names.session(grant.sid)
    record = await rig.raw.get(key)
    out = handshake(keys, sid=grant.sid, field="j")
    # A forged copy fails authentication first, and does not spend the mid.
    forged = _fields(_tamper(out.request, "authTag"))
    forged_id = await rig.raw.send_fields(forged)
    await _assert_refused(
        rig,
        forged_id,
        forged,
        reason="auth_failed",
        notice="rejected",
        sid=grant.sid,
        mid=out.request.mid,
        type_=HANDSHAKE_TYPE,
        alg=ALG_RSA,
    )
    fields = _fields(out.request)
    first = await rig.raw.send_fields(fields)
    assert b"session_invalid" == (await rig.raw.letter_for(first))["reason"]
    second = await rig.raw.send_fields(fields)
    letter = await rig.raw.letter_for(second)
    assert b"replay" == letter["reason"]
    assert {"sid", "mid", "type", "j"} <= set(letter)
    notices = await _notices(rig.raw, grant.sid, out.request.mid)
    assert ["rejected", "rejected", "replay"] == [env["code"] for _, env in notices]
    assert {"j"} == {name for name, _ in notices}
    assert ["rejected"] * 3 == await _statuses(rig.raw, grant.sid, out.request.mid)
    await rig.raw.wait_drained()
    assert record == await rig.raw.get(key)
    await _assert_serving(rig, grant)


async def test_tampered_handshake_fails_authentication(rig: Rig, keys: ThrowawayKeys) -> None:
    """A handshake changed after sealing (tag, wrapped Kb, sid, ts) is auth_failed; no session."""
    changes: list[tuple[str, Callable[[wire.Request], wire.Request]]] = [
        ("authTag", lambda r: _tamper(r, "authTag")),
        ("encryptedAesKey", lambda r: _tamper(r, "encryptedAesKey")),
        ("sid", lambda r: dataclasses.replace(r, sid=new_id())),
        ("ts", lambda r: _tamper(r, "ts")),
    ]
    for label, change in changes:
        for field in _ENCODINGS:
            with _case(f"{label} {field}"):
                out = handshake(keys, field=field)
                bad = change(out.request)
                await _send_refused(
                    rig,
                    bad,
                    reason="auth_failed",
                    notice="rejected",
                    sid=bad.sid,
                    mid=bad.mid,
                    type_=HANDSHAKE_TYPE,
                    alg=ALG_RSA,
                )
                for sid in {bad.sid, out.request.sid}:
                    assert await rig.raw.get(rig.raw.names.session(sid)) is None
    good = handshake(keys)
    await rig.raw.send(good.request)
    # Key generation runs at the lowest priority: on a busy machine it waits for spare CPU.
    reply = await rig.raw.reply(good.request.sid, good.request.mid, timeout=30)
    assert good.request.sid == open_ok(reply, good)["sessionId"]


async def test_handshake_with_low_order_ephemeral_is_bad_payload(
    rig: Rig,
    keys: ThrowawayKeys,
) -> None:
    """A low-order or invalid clientEphemeral gets error bad_payload under Kb, no dead letter."""
    low_order: list[tuple[str, bytes, wire.Field]] = [
        ("all-zero", bytes(32), "e"),
        ("all-zero", bytes(32), "j"),
        ("u = 1", b"\x01" + bytes(31), "e"),
        ("31 bytes", os.urandom(31), "e"),
    ]
    for label, ec, field in low_order:
        with _case(f"{label} {field}"):
            out = handshake(keys, ec=ec, field=field)
            await rig.raw.send(out.request)
            reply = await rig.raw.reply(out.request.sid, out.request.mid)
            assert "bad_payload" == _error_body(reply, out)["code"]
            await rig.raw.wait_drained()
            assert ["error"] == await _statuses(rig.raw, out.request.sid, out.request.mid)
            assert await rig.raw.get(rig.raw.names.session(out.request.sid)) is None
    assert [] == await rig.raw.dead_letters()
    await _assert_serving(rig, await rig.raw.grant())


# -- authenticated requests that fail -------------------------------------------------


async def test_undecodable_plaintext_is_bad_payload(rig: Rig) -> None:
    """An authentic request whose plaintext is not one strict value gets bad_payload only."""
    grant = await rig.raw.grant()
    plaintexts: list[tuple[str, wire.Field, bytes]] = [
        (ALG_SK, "e", b"\xc1"),
        (ALG_SK, "e", codec.dumps({}, "e") + b"\x00"),
        (ALG_RSA, "j", b"{not json"),
        (ALG_SK, "j", b'{"a":1,"a":2}'),
    ]
    for alg, field, plaintext in plaintexts:
        with _case(f"{alg} {field} {plaintext!r}"):
            out = rig.raw.seal(grant, None, alg=alg, field=field, plaintext=plaintext)
            await rig.raw.send(out.request)
            reply = await rig.raw.reply(grant.sid, out.request.mid)
            assert "bad_payload" == _error_body(reply, out)["code"]
            await rig.raw.wait_drained()
    assert [] == await rig.raw.dead_letters()
    assert 0 == sum(rig.calls.values())
    await _assert_serving(rig, grant)


async def test_handler_exception_is_handler_error_and_dead_letter(rig: Rig) -> None:
    """A raising handler gives an error handler_error (no exception text) and a dead letter."""
    grant = await rig.raw.grant()
    for alg, field in _BOTH:
        with _case(f"{alg} {field}"):
            out = rig.raw.seal(grant, {}, alg=alg, field=field, type_="boom")
            fields = _fields(out.request)
            entry_id = await rig.raw.send_fields(fields)
            reply = await rig.raw.reply(grant.sid, out.request.mid)
            body = _error_body(reply, out)
            assert "handler_error" == body["code"]
            assert _LEAK not in body["message"]
            await _assert_refused(
                rig,
                entry_id,
                fields,
                reason="handler_error",
                notice=None,
                sid=grant.sid,
                mid=out.request.mid,
                type_="boom",
                alg=alg,
            )
            assert ["error"] == await _statuses(rig.raw, grant.sid, out.request.mid)
    assert 2 == rig.calls["boom"]
    await _assert_serving(rig, grant)


async def test_handler_timeout_is_timeout_and_dead_letter(rig: Rig) -> None:
    """A handler running past its timeout gives an error timeout and a dead letter."""
    grant = await rig.raw.grant()
    out = rig.raw.seal(grant, {}, type_="slow")
    fields = _fields(out.request)
    entry_id = await rig.raw.send_fields(fields)
    reply = await rig.raw.reply(grant.sid, out.request.mid)
    assert "timeout" == _error_body(reply, out)["code"]
    await _assert_refused(
        rig,
        entry_id,
        fields,
        reason="timeout",
        notice=None,
        sid=grant.sid,
        mid=out.request.mid,
        type_="slow",
        alg=ALG_SK,
    )
    assert ["error"] == await _statuses(rig.raw, grant.sid, out.request.mid)
    assert 1 == rig.calls["slow"]
    await _assert_serving(rig, grant)


# -- delivery limit -------------------------------------------------------------------


async def test_delivery_limit_is_refused_without_running(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """An entry delivered more than delivery_limit times is refused unrun; at the limit it runs."""
    fast = dataclasses.replace(settings, claim_idle_ms=200)
    limit = fast.delivery_limit
    raw = Raw(redis, fast.prefix, keys)
    grant = await raw.grant()
    await raw.store.ensure_groups(1)
    stream = raw.names.request_stream(0)
    at_limit = raw.seal(grant, {}, type_="count")
    over = raw.seal(grant, {}, type_="count")
    over_fields = _fields(over.request)
    at_limit_id = await raw.send_fields(_fields(at_limit.request))
    over_id = await raw.send_fields(over_fields)
    # Another consumer took both and vanished; the worker's XAUTOCLAIM adds one delivery.
    await redis.xreadgroup("workers", "ghost", {stream: ">"}, count=2)
    for entry_id, count in ((at_limit_id, limit - 1), (over_id, limit)):
        await redis.xclaim(stream, "workers", "ghost", 0, [entry_id], idle=60_000, retrycount=count)
    async with _serving(fast, keys, redis) as rig:
        reply = await rig.raw.reply(grant.sid, at_limit.request.mid)
        assert {"counted": 1} == open_ok(reply, at_limit)
        letter = await _assert_refused(
            rig,
            over_id,
            over_fields,
            reason="delivery_limit",
            notice="delivery_limit",
            sid=grant.sid,
            mid=over.request.mid,
            type_="count",
            alg=ALG_SK,
            attempts=None,
        )
        assert limit + 1 == int(letter["attempts"])
        assert 1 == rig.calls["count"]
        assert [] == await rig.raw.letters_for(at_limit_id)
        await _assert_serving(rig, grant)
