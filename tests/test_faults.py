"""Fault tests with real worker processes: SIGKILL, dropped connections, SIGTERM.

Every request must get exactly one ``ok`` reply, whatever happens to workers.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from tests.helpers import Raw, open_client, wait_until
from tests.procs import WorkerProcs, encode_all, outcomes, wait_answered, wait_started
from worker import Client, RemoteError, ReplyTimeout, envelopes
from worker.demo_app import app as demo_app
from worker.handshake import SessionGrant
from worker.protocol import ALG_RSA, ALG_SK
from worker.settings import Settings
from worker.streams import connect
from worker.testing import RedisServer, ThrowawayKeys, running_worker

pytestmark = pytest.mark.slow


async def _load(
    raw: Raw, sessions: int, per_session: int, ms: int
) -> tuple[list[SessionGrant], list[envelopes.Outgoing]]:
    grants = [await raw.grant() for _ in range(sessions)]
    outs = []
    for i in range(sessions * per_session):
        grant = grants[i % sessions]
        alg = ALG_RSA if i % 10 == 0 else ALG_SK
        outs.append(
            raw.seal(grant, {"ms": ms}, type_="sleep", alg=alg, field="e" if i % 2 else "j")
        )
    return grants, outs


async def _push(raw: Raw, outs: list[envelopes.Outgoing], batch: int = 200) -> None:
    stream = raw.names.request_stream(0)
    entries = encode_all([o.request for o in outs])
    for start in range(0, len(entries), batch):
        async with raw.redis.pipeline(transaction=False) as pipe:
            for entry in entries[start : start + batch]:
                pipe.xadd(stream, entry)
            await pipe.execute()


def _assert_exactly_one_ok(got: dict[str, Counter[str]], mids: set[str]) -> None:
    bad = {mid: dict(c) for mid, c in got.items() if mid in mids and c != Counter(ok=1)}
    assert {} == bad
    assert mids == set(got)


async def _answered(raw: Raw, grants: list[SessionGrant]) -> int:
    return len(await outcomes(raw, grants))


async def _until_answered(raw: Raw, grants: list[SessionGrant], n: int) -> None:
    """Wait until at least ``n`` requests have a reply."""

    async def enough() -> bool:
        return await _answered(raw, grants) >= n

    await wait_until(enough, timeout=60, interval=0.01)


async def test_sigkill_a_worker_loses_nothing(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """3 workers serve 3,000 requests; one is SIGKILLed and replaced: each gets one ok."""
    raw = Raw(redis, settings.prefix, keys)
    procs = WorkerProcs(settings, keys, tmp_path)
    grants, outs = await _load(raw, sessions=20, per_session=150, ms=20)
    mids = {o.request.mid for o in outs}
    try:
        victim = procs.start("--concurrency", "32")
        procs.start("--concurrency", "32")
        procs.start("--concurrency", "32")
        await wait_started(redis, settings.prefix, 3)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_push, raw, outs)
            await _until_answered(raw, grants, 600)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            procs.start("--concurrency", "32")
        got = await wait_answered(raw, grants, mids)
        await raw.wait_drained(timeout=30)
        _assert_exactly_one_ok(await outcomes(raw, grants), mids)
        assert got.keys() == mids
        assert -9 == victim.returncode
        assert "entry_reclaimed" in procs.logs()
    finally:
        procs.kill_all()


async def test_killed_connections_lose_nothing(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Workers' Redis connections are killed (CLIENT KILL) under load: each request gets one ok."""
    raw = Raw(redis, settings.prefix, keys)
    procs = WorkerProcs(settings, keys, tmp_path)
    grants, outs = await _load(raw, sessions=10, per_session=150, ms=10)
    mids = {o.request.mid for o in outs}
    try:
        for _ in range(2):
            procs.start("--concurrency", "32")
        await wait_started(redis, settings.prefix, 2)
        killed = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(_push, raw, outs)
            for round_ in range(1, 6):
                await _until_answered(raw, grants, round_ * 150)
                for c in await redis.client_list():
                    if c["name"].startswith("sealstream-worker:"):
                        killed += await redis.execute_command("CLIENT", "KILL", "ID", c["id"])
        await wait_answered(raw, grants, mids)
        await raw.wait_drained(timeout=30)
        _assert_exactly_one_ok(await outcomes(raw, grants), mids)
        assert killed >= 5
        assert all(p.poll() is None for p in procs.procs)
    finally:
        procs.kill_all()


async def test_redis_outage_is_ridden_out_and_logged_once(
    keys: ThrowawayKeys, tmp_path: Path, prefix: str
) -> None:
    """Redis goes away for ~2 s mid-load: workers wait, log the outage once, lose nothing."""
    server = RedisServer.launch()
    try:
        settings = Settings(redis_url=server.url, prefix=prefix)
        client = connect(server.url)
        raw = Raw(client, prefix, keys)
        procs = WorkerProcs(settings, keys, tmp_path)
        grants, outs = await _load(raw, sessions=5, per_session=200, ms=20)
        mids = {o.request.mid for o in outs}
        await _push(raw, outs)
        procs.start("--concurrency", "16")
        await wait_started(client, prefix, 1)
        await _until_answered(raw, grants, 100)
        await client.aclose()
        server.shutdown_saving()
        await anyio.sleep(2)  # the outage itself: nothing to wait on but time
        server = server.restarted()
        client = connect(server.url)
        raw = Raw(client, prefix, keys)
        await wait_answered(raw, grants, mids)
        await raw.wait_drained(timeout=30)
        _assert_exactly_one_ok(await outcomes(raw, grants), mids)
        logs = procs.logs()
        assert 1 == logs.count('"redis_unavailable"')
        assert 1 == logs.count('"redis_reconnected"')
        assert procs.procs[0].poll() is None
        await client.aclose()
    finally:
        procs.kill_all()
        server.stop()


async def test_sigterm_under_load_exits_zero_and_loses_nothing(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """SIGTERM mid-load: in-flight work is finished and acked, exit 0; the rest is served later."""
    raw = Raw(redis, settings.prefix, keys)
    procs = WorkerProcs(settings, keys, tmp_path)
    grants, outs = await _load(raw, sessions=5, per_session=100, ms=100)
    mids = {o.request.mid for o in outs}
    try:
        worker = procs.start("--concurrency", "50")
        await wait_started(redis, settings.prefix, 1)
        await _push(raw, outs)
        await _until_answered(raw, grants, 100)
        worker.send_signal(signal.SIGTERM)
        await wait_until(lambda: worker.poll() is not None, timeout=30, interval=0.05)
        assert 0 == worker.returncode
        assert 0 == await raw.pending(), "the stopped worker left unacknowledged entries"
        answered_before = await _answered(raw, grants)
        assert answered_before < len(mids), "the load finished before SIGTERM; nothing was tested"
        procs.start("--burst")
        await wait_answered(raw, grants, mids)
        _assert_exactly_one_ok(await outcomes(raw, grants), mids)
        await wait_until(lambda: procs.procs[-1].poll() is not None, timeout=30, interval=0.05)
        assert 0 == procs.procs[-1].returncode
    finally:
        procs.kill_all()


async def test_request_timeout_holds_while_redis_is_frozen(
    keys: ThrowawayKeys, prefix: str
) -> None:
    """With Redis frozen (SIGSTOP), request(timeout=1) raises ReplyTimeout, well before
    any socket timeout; once Redis thaws, the same session works again."""
    server = RedisServer.launch()
    try:
        settings = Settings(redis_url=server.url, prefix=prefix)
        async with running_worker(demo_app, settings, keys):
            async with Client.from_url(server.url, kid=keys.service.kid, prefix=prefix) as client:
                async with client.session() as session:
                    assert [1] == await session.request("echo", [1])
                    server.process.send_signal(signal.SIGSTOP)
                    try:
                        # (without the fix: 3 x 15 s socket timeouts, then a redis error)
                        with anyio.fail_after(10), pytest.raises(ReplyTimeout):
                            await session.request("echo", [2], timeout=1)
                    finally:
                        server.process.send_signal(signal.SIGCONT)
                    assert [3] == await session.request("echo", [3], timeout=30)
    finally:
        server.stop()


async def test_sigterm_with_a_stuck_plain_handler_still_exits(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """A plain handler stuck past its timeout is answered ``timeout``; its thread cannot
    be stopped, yet SIGTERM still ends the worker (exit 0) instead of waiting for it."""
    procs = WorkerProcs(settings, keys, tmp_path)
    try:
        proc = procs.start("tests.apps:leaky")
        await wait_started(redis, settings.prefix, 1)
        async with open_client(settings, keys) as client:
            async with client.session() as session:
                with pytest.raises(RemoteError) as err:
                    await session.request("stuck", {})
                assert "timeout" == err.value.code
        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: proc.poll() is not None, timeout=20, interval=0.05)
        assert 0 == proc.returncode
        assert "exit_past_stuck_handlers" in procs.logs()
    finally:
        procs.kill_all()
