"""The client against a hostile or lossy Redis: forged entries, lost replies, bad config."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from tests.helpers import Raw, open_client, wait_until
from worker import Client, ConfigError, ReplyTimeout, envelopes, wire
from worker.client import ClientSession, Result
from worker.demo_app import app
from worker.handshake import SessionGrant
from worker.keyspace import Names
from worker.protocol import ALG_RSA, ALG_SK, HANDSHAKE_TYPE
from worker.settings import Settings
from worker.streams import Entry
from worker.testing import ThrowawayKeys, running_worker


def _client(settings: Settings, keys: ThrowawayKeys) -> Client:
    return open_client(settings, keys, service_public_key=keys.service.public_pem)


class _Gate:
    """Holds a client's reply reads until opened, so a test can line up a batch."""

    def __init__(self, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = anyio.Event()
        read = client.store.read_replies

        async def gated(sid: str, *, after: str, block_ms: int, count: int = 100) -> list[Entry]:
            await self.open.wait()
            return await read(sid, after=after, block_ms=block_ms, count=count)

        monkeypatch.setattr(client.store, "read_replies", gated)


async def _sent(redis: aioredis.Redis, prefix: str, type_: str) -> wire.Request:
    """Wait for the first request of ``type_`` on shard 0; return it."""
    stream = Names(prefix).request_stream(0)

    async def sent() -> wire.Request | None:
        requests = [wire.decode_request(fields) for _, fields in await redis.xrange(stream)]
        return next((r for r in requests if r.type == type_), None)

    return await wait_until(sent, timeout=10, interval=0.01)


async def _wait_reply(raw: Raw, sid: str, mid: str, status: str, timeout: float = 10) -> None:
    """Wait until ``sid``'s reply stream holds a ``status`` reply to ``mid``."""
    await raw.reply_with(sid, mid, status, timeout=timeout, interval=0.01)


async def _forge_notice(raw: Raw, sid: str, mid: str) -> None:
    """XADD an unauthenticated ``rejected`` notice for ``mid`` (anyone with Redis can)."""
    notice = envelopes.notice(field="e", sid=sid, mid=mid, code="rejected", alg=ALG_SK)
    await raw.redis.xadd(raw.names.reply_stream(sid), wire.encode_reply(notice))


async def _by_request(session: ClientSession, payload: Any) -> Any:
    return await session.request("echo", payload)


async def _by_submit(session: ClientSession, payload: Any) -> Any:
    await session.submit("echo", payload)
    results: AsyncIterator[Result] = session.replies()
    result = await anext(results)
    assert "ok" == result.status
    return result.unwrap()


@pytest.mark.parametrize("forged_first", [False, True], ids=["forged_after", "forged_before"])
@pytest.mark.parametrize("call", [_by_request, _by_submit], ids=["request", "submit"])
async def test_authenticated_reply_wins_over_a_forged_notice_in_its_batch(
    settings: Settings,
    keys: ThrowawayKeys,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    call: Callable[[ClientSession, Any], Awaitable[Any]],
    forged_first: bool,
) -> None:
    """A forged ``rejected`` notice read in the same batch as the genuine ``ok`` reply to
    the same mid (before or after it) does not replace the result."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    outcome: list[Any] = []
    async with _client(settings, keys) as client:
        gate = _Gate(client, monkeypatch)
        async with client.session(grant) as session, anyio.create_task_group() as tg:

            async def ask() -> None:
                outcome.append(await call(session, {"genuine": True}))

            tg.start_soon(ask)
            request = await _sent(redis, settings.prefix, "echo")
            if forged_first:
                await _forge_notice(raw, grant.sid, request.mid)
            async with running_worker(app, settings, keys):
                await _wait_reply(raw, grant.sid, request.mid, "ok")
            if not forged_first:
                await _forge_notice(raw, grant.sid, request.mid)
            gate.open.set()  # the reader now reads both entries in one batch
    assert [{"genuine": True}] == outcome


async def test_handshake_ignores_a_forged_reply(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A forged ``ok`` handshake reply (one that does not open) is logged and ignored;
    the handshake completes with the worker's genuine reply."""
    raw = Raw(redis, settings.prefix, keys)
    grants: list[SessionGrant] = []
    async with _client(settings, keys) as client:
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                handshaken = anyio.Event()

                async def handshake() -> None:
                    grants.append(await client.handshake(timeout=30))
                    handshaken.set()

                tg.start_soon(handshake)
                request = await _sent(redis, settings.prefix, HANDSHAKE_TYPE)
                forged = wire.Reply(
                    field=request.field,
                    alg=ALG_RSA,
                    sid=request.sid,
                    mid=request.mid,
                    status="ok",
                    iv=os.urandom(12),
                    encrypted_data=os.urandom(200),
                    auth_tag=os.urandom(16),
                )
                await redis.xadd(raw.names.reply_stream(request.sid), wire.encode_reply(forged))
                async with running_worker(app, settings, keys):
                    # Key generation runs at the lowest priority: a busy machine makes it wait.
                    await _wait_reply(raw, request.sid, request.mid, "ok", timeout=30)
                    # Both on the stream now; the handshake must take the genuine one.
                    with anyio.fail_after(30):
                        await handshaken.wait()
                    async with client.session(grants[0]) as session:
                        assert [1] == await session.request("echo", [1])
        assert request.sid == grants[0].sid
        unauthentic = [e for e in logs if e["event"] == "reply_unauthentic"]
        assert [{"session_id": request.sid, "message_id": request.mid}] == [
            {k: e[k] for k in ("session_id", "message_id")} for e in unauthentic
        ]


async def test_submit_without_a_reply_yields_a_timeout_result(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A submitted request with no reply within ``timeout`` (no worker runs) gives a
    ``timeout`` result from replies(), whose unwrap() raises ReplyTimeout; nothing is
    outstanding afterwards."""
    grant = await Raw(redis, settings.prefix, keys).grant()
    async with _client(settings, keys) as client, client.session(grant) as session:
        with anyio.fail_after(10):
            mid = await session.submit("echo", {}, timeout=0.2)
            result = await anext(session.replies())
        assert (mid, "timeout") == (result.mid, result.status)
        with pytest.raises(ReplyTimeout) as err:
            result.unwrap()
        assert mid == err.value.message_id
        assert 0 == session.outstanding


async def test_lost_replies_do_not_wedge_submit(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """With max_in_flight=2 and every reply lost (no worker), six submits still go out:
    each timeout result taken from replies() gives its slot back."""
    grant = await Raw(redis, settings.prefix, keys).grant()
    statuses: list[str] = []
    async with _client(settings, keys) as client, client.session(grant, max_in_flight=2) as s:
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:

                async def take() -> None:
                    async for result in s.replies():
                        statuses.append(result.status)
                        if len(statuses) == 6:
                            return

                tg.start_soon(take)
                for i in range(6):
                    await s.submit("echo", {"i": i}, timeout=0.2)
    assert ["timeout"] * 6 == statuses


async def test_results_not_taken_keep_their_slots(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """The results queue is bounded by max_in_flight: answered results not yet taken
    from replies() keep their slots, so a further submit waits until one is taken."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with (
        running_worker(app, settings, keys),
        _client(settings, keys) as client,
        client.session(grant, max_in_flight=2) as session,
    ):
        mids = [await session.submit("echo", {"i": i}) for i in range(2)]
        with anyio.fail_after(10):
            for mid in mids:
                await _wait_reply(raw, grant.sid, mid, "ok")
            # The reader settles them.
            await wait_until(lambda: not session.outstanding, timeout=10, interval=0.01)
        with anyio.move_on_after(0.5) as blocked:
            await session.submit("echo", {"i": 2})
        assert blocked.cancelled_caught
        with anyio.fail_after(10):
            first = await anext(session.replies())
            assert first.mid in mids
            third = await session.submit("echo", {"i": 2})
            rest = {(await anext(session.replies())).mid for _ in range(2)}
        assert set(mids) - {first.mid} | {third} == rest


@pytest.mark.parametrize("shards", ["0", "-1", "abc", "1025", "1.5", "٣"])
async def test_bad_shards_in_config_is_a_config_error(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, shards: str
) -> None:
    """A ``P:config`` whose ``shards`` is not an integer 1..1024 (Redis can be written by
    anyone) is a ConfigError naming ``P:config shards``, for the handshake and for a
    session given by a trusted back end alike."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    await redis.hset(
        raw.names.config,
        mapping={
            "shards": shards,
            "servicePublicKey": keys.service.public_pem,
            "kid": keys.service.kid,
        },
    )
    async with open_client(settings, keys) as client:
        with pytest.raises(ConfigError, match="P:config shards"):
            await client.handshake(timeout=1)
    async with open_client(settings, keys) as client:
        with pytest.raises(ConfigError, match="P:config shards"):
            async with client.session(grant) as session:
                await session.request("echo", {}, timeout=1)
