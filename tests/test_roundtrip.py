"""End-to-end round trips on a real Redis: handshake, both algorithms, both encodings."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests.helpers import Raw, open_client, open_ok, wait_until
from worker import App, RemoteError, ReplyTimeout, wire
from worker.demo_app import app
from worker.protocol import ALG_RSA, ALG_SK
from worker.settings import Settings
from worker.testing import ThrowawayKeys, running_worker

PAYLOAD: dict[str, Any] = {
    "text": "héllo",
    "n": 42,
    "list": [1, 2.5, None, True],
    "nested": {"a": {}},
}


@pytest.mark.parametrize("alg", [ALG_SK, ALG_RSA])
@pytest.mark.parametrize("encoding", ["e", "j"])
async def test_handshake_then_echo(
    settings: Settings, keys: ThrowawayKeys, alg: str, encoding: str
) -> None:
    """A client handshakes, then echo round-trips in each algorithm and encoding."""
    async with running_worker(app, settings, keys):
        async with (
            open_client(settings, keys, encoding=encoding) as client,
            client.session(alg=alg) as session,
        ):
            assert PAYLOAD == await session.request("echo", PAYLOAD)


async def test_binary_payload_in_messagepack(settings: Settings, keys: ThrowawayKeys) -> None:
    """MessagePack payloads carry raw bytes both ways."""
    async with running_worker(app, settings, keys):
        async with open_client(settings, keys) as client:
            async with client.session() as session:
                assert {"blob": b"\x00\xff" * 10} == await session.request(
                    "echo", {"blob": b"\x00\xff" * 10}
                )


async def test_sleep_and_fail_handlers(settings: Settings, keys: ThrowawayKeys) -> None:
    """``sleep`` returns what it slept; ``fail`` gives an authenticated handler_error."""
    async with running_worker(app, settings, keys):
        async with open_client(settings, keys) as client:
            async with client.session() as session:
                assert {"slept": 5} == await session.request("sleep", {"ms": 5})
                with pytest.raises(RemoteError) as err:
                    await session.request("fail", {})
                assert "handler_error" == err.value.code
                assert "this handler always fails" not in err.value.remote_message


async def test_unknown_type_and_bad_payload(settings: Settings, keys: ThrowawayKeys) -> None:
    """An unknown type and a payload the handler refuses get their error codes."""
    async with running_worker(app, settings, keys):
        async with open_client(settings, keys) as client:
            async with client.session() as session:
                with pytest.raises(RemoteError) as unknown:
                    await session.request("nope", {})
                assert "unknown_type" == unknown.value.code
                with pytest.raises(RemoteError) as bad:
                    await session.request("sleep", {"ms": "soon"})
                assert "bad_payload" == bad.value.code


async def test_submit_and_iterate_replies(settings: Settings, keys: ThrowawayKeys) -> None:
    """Replies to submitted requests come from the session's reply iterator."""
    async with running_worker(app, settings, keys):
        async with open_client(settings, keys) as client:
            async with client.session() as session:
                mids = {await session.submit("echo", {"i": i}) for i in range(20)}
                got = {}
                async for result in session.replies():
                    got[result.mid] = result.unwrap()
                    if len(got) == len(mids):
                        break
                assert mids == set(got)
                assert {i for i in range(20)} == {v["i"] for v in got.values()}


async def test_trusted_backend_session(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A session created by a trusted back end works without a handshake."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        async with open_client(settings, keys) as client:
            async with client.session(grant, alg=ALG_RSA) as session:
                assert [1, 2] == await session.request("echo", [1, 2])


async def test_reply_is_sealed_under_request_key(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A raw request's reply opens with the request's reply key and the reply AAD."""
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, settings, keys):
        for alg in (ALG_SK, ALG_RSA):
            out = raw.seal(grant, {"x": alg}, alg=alg)
            await raw.send(out.request)
            reply = await raw.reply(grant.sid, out.request.mid)
            assert ("ok", alg) == (reply.status, reply.alg)
            assert {"x": alg} == open_ok(reply, out)


async def test_config_is_published(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """On start a worker publishes shards, servicePublicKey and kid, and creates groups."""
    async with running_worker(app, settings, keys):
        config = await redis.hgetall(f"{settings.prefix}:config")
        assert keys.service.kid.encode() == config[b"kid"]
        assert b"1" == config[b"shards"]
        assert keys.service.public_pem.encode() == config[b"servicePublicKey"]
        groups = await redis.xinfo_groups(f"{settings.prefix}:req:{{0}}")
        assert [b"workers"] == [g["name"] for g in groups]


async def test_errors_leave_the_session_block_unwrapped(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """A RemoteError raised in a session block reaches the caller as itself, not a group."""
    async with running_worker(app, settings, keys):
        async with open_client(settings, keys) as client:
            with pytest.raises(RemoteError):
                async with client.session() as session:
                    await session.request("fail", {})


async def test_a_copy_of_a_pending_request_does_not_cancel_it(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A replayed copy of a request in flight gets a replay notice; the client still gets ok."""
    async with running_worker(app, settings, keys):
        async with (
            open_client(settings, keys) as c,
            c.session() as session,
        ):
            async with anyio.create_task_group() as tg:
                result: list[Any] = []

                async def ask() -> None:
                    # Long enough for the copy to arrive while it runs, on a loaded machine.
                    result.append(await session.request("sleep", {"ms": 1000}))

                tg.start_soon(ask)
                stream = f"{settings.prefix}:req:{{0}}"

                async def sent() -> list[dict[bytes, bytes]]:
                    return [
                        fields
                        for _, fields in await redis.xrange(stream)
                        if wire.decode_request(fields).type == "sleep"
                    ]

                entries = await wait_until(sent, timeout=5, interval=0.01)
                await redis.xadd(stream, entries[0])
            assert [{"slept": 1000}] == result
            codes = [r.code for r in await Raw(redis, settings.prefix, keys).replies(session.sid)]
            assert "replay" in codes


results = App()


@results.handler("int_keys")
async def int_keys(payload: Any) -> Any:
    """A result a strict reader would refuse: a map with an integer key."""
    return {1: "a"}


@results.handler("pair")
async def pair(payload: Any) -> Any:
    """A tuple result."""
    return ("a", 1.0)


@pytest.mark.parametrize("encoding", ["e", "j"])
async def test_result_with_non_string_keys_is_handler_error(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, encoding: str
) -> None:
    """A result with a non-string map key is a handler_error (and a dead letter) in both
    encodings, not a reply the client cannot read or JSON with the key quietly changed."""
    async with running_worker(results, settings, keys):
        async with open_client(settings, keys, encoding=encoding) as client:
            async with client.session() as session:
                with pytest.raises(RemoteError) as err:
                    await session.request("int_keys", {})
                assert "handler_error" == err.value.code
                # Tuples go out as arrays; 1.0 in JSON as JavaScript writes it.
                expected = ["a", 1] if encoding == "j" else ["a", 1.0]
                assert expected == await session.request("pair", {})
    letters = await Raw(redis, settings.prefix, keys).dead_letters()
    assert [b"handler_error"] == [letter["reason"] for letter in letters]


escapes = App()


@escapes.handler("stray_cancel")
async def stray_cancel(payload: Any) -> Any:
    """Await a future somebody else cancelled: a CancelledError nobody asked of us."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.cancel()
    await future


@escapes.handler("exits")
async def exits(payload: Any) -> Any:
    """Call sys.exit from handler code."""
    sys.exit(3)


@escapes.handler("exits_in_thread")
def exits_in_thread(payload: Any) -> Any:
    """A plain handler calling sys.exit (it runs in a thread)."""
    sys.exit(3)


@escapes.handler("echo")
async def echo_(payload: Any) -> Any:
    """Return the payload."""
    return payload


@pytest.mark.parametrize("type_", ["stray_cancel", "exits", "exits_in_thread"])
async def test_handler_cannot_stop_the_worker(
    settings: Settings, keys: ThrowawayKeys, type_: str
) -> None:
    """A handler raising SystemExit or a stray CancelledError is a handler_error; the
    worker goes on serving (it would otherwise stop, and every worker after it)."""
    async with running_worker(escapes, settings, keys) as worker:
        async with open_client(settings, keys) as client:
            async with client.session() as session:
                for _ in range(2):
                    with pytest.raises(RemoteError) as err:
                        await session.request(type_, {})
                    assert "handler_error" == err.value.code
                assert {"still": "serving"} == await session.request("echo", {"still": "serving"})
        assert 2 == worker.stats["error"]


async def test_in_flight_requests_are_capped_per_session(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """With max_in_flight=3, a fourth request waits for a slot (so replies cannot pile
    up past what the workers keep in the reply stream); replies free the slots."""
    grant = await Raw(redis, settings.prefix, keys).grant()
    async with open_client(settings, keys) as client:
        async with client.session(grant, max_in_flight=3) as session:
            mids = {await session.submit("echo", {"i": i}) for i in range(3)}
            with anyio.move_on_after(0.5) as blocked:  # no worker yet: no replies
                await session.submit("echo", {"i": 3})
            assert blocked.cancelled_caught
            with pytest.raises(ReplyTimeout):
                await session.request("echo", {"i": 3}, timeout=0.3)
            assert 3 == session.outstanding
            async with running_worker(app, settings, keys):
                with anyio.fail_after(10):
                    got = set()
                    async for result in session.replies():
                        got.add(result.mid)
                        if len(got) == 1:  # taking a result gave its slot back
                            mids.add(await session.submit("echo", {"i": 3}))
                        if got == mids:
                            break
                assert [5] == await session.request("echo", [5])
            assert 0 == session.outstanding
    with pytest.raises(ValueError, match="max_in_flight"):
        async with client.session(grant, max_in_flight=0):
            pass
