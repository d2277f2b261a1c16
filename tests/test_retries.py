"""Retry policies on a real Redis: which failures retry, the backoff between attempts,
the replay record's lifetime, and the attempt count across a crash."""

from __future__ import annotations

import dataclasses
import itertools
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests.apps import retrying
from tests.helpers import Raw, open_client, open_ok
from tests.procs import WorkerProcs, wait_started
from worker import App, Backoff, Context, RemoteError, RetryPolicy, Settings
from worker.testing import ThrowawayKeys, running_worker


def test_backoff_grows_exponentially_up_to_its_cap_with_jitter_in_the_upper_half() -> None:
    """Without jitter the waits are base, 2 base, 4 base... capped; with jitter each
    is drawn from the upper half of that, and the budget counts the longest waits."""
    plain = Backoff(base_s=0.1, cap_s=0.3, jitter=False)
    assert [0.1, 0.2, 0.3, 0.3] == [plain.delay_s(n) for n in range(1, 5)]
    jittered = Backoff(base_s=0.1, cap_s=5, jitter=True)
    assert all(0.1 <= jittered.delay_s(2) <= 0.2 for _ in range(100))
    policy = RetryPolicy(retries=3, backoff=plain)
    assert pytest.approx(4 * 2.0 + 0.1 + 0.2 + 0.3) == policy.budget_s(2.0)


async def _request(settings: Settings, keys: ThrowawayKeys, type_: str) -> Any:
    async with (
        open_client(settings, keys) as client,
        client.session() as session,
    ):
        return await session.request(type_, {}, timeout=20)


async def test_listed_exceptions_retry_after_growing_waits(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """A ConnectionError in retry_on is retried after base, then 2 x base; the third
    attempt's result is the reply, and each retry is counted in the metric."""
    app = App()
    started: list[float] = []

    @app.handler(
        "db",
        retries=3,
        backoff=Backoff(base_s=0.2, cap_s=5, jitter=False),
        retry_on=(ConnectionError,),
    )
    async def db(payload: Any, ctx: Context) -> Any:
        started.append(time.monotonic())
        if ctx.attempt < 3:
            raise ConnectionError("away")
        return ctx.attempt

    async with running_worker(app, settings, keys) as worker:
        assert 3 == await _request(settings, keys, "db")
        assert 2.0 == worker.metrics.retries.labels(type="db")._value.get()
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert 0.2 <= gaps[0] and 0.4 <= gaps[1]


async def test_an_exception_outside_retry_on_answers_at_once(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """A ValueError, not in retry_on=(ConnectionError,), is a handler_error after one
    attempt although retries remain."""
    calls: Counter[str] = Counter()
    app = App(retries=5, retry_on=(ConnectionError,))

    @app.handler("bug")
    async def bug(payload: Any) -> Any:
        calls["bug"] += 1
        raise ValueError("a bug, not an outage")

    async with running_worker(app, settings, keys):
        with pytest.raises(RemoteError) as err:
            await _request(settings, keys, "bug")
    assert ("handler_error", 1) == (err.value.code, calls["bug"])


async def test_timeouts_retry_with_the_policys_backoff(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """An attempt past its time limit is retried after the backoff wait (timeouts always
    count), and the last one's timeout is the answer."""
    app = App()
    started: list[float] = []

    @app.handler(
        "hang",
        timeout_s=0.1,
        retry=RetryPolicy(
            retries=1,
            backoff=Backoff(base_s=0.3, cap_s=0.3, jitter=False),
            retry_on=(ConnectionError,),
        ),
    )
    async def hang(payload: Any) -> Any:
        started.append(time.monotonic())
        await anyio.sleep(30)

    async with running_worker(app, settings, keys):
        with pytest.raises(RemoteError) as err:
            await _request(settings, keys, "hang")
    assert "timeout" == err.value.code
    assert 2 == len(started) and 0.3 + 0.1 <= started[1] - started[0]


async def test_replay_record_and_attempt_record_cover_the_backoff(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A policy of 2 retries with 10-minute waits gets a replay record outliving both
    waits; the attempt record, written when the retry is scheduled, lives no longer."""
    app = App()
    waiting = anyio.Event()

    @app.handler(
        "slow_retry",
        timeout_s=1,
        retries=2,
        backoff=Backoff(base_s=600, cap_s=600, jitter=False),
    )
    async def slow_retry(payload: Any) -> Any:
        waiting.set()
        raise ConnectionError("away")

    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    # A stopping worker does not cut a backoff short: the grace period ends the wait.
    async with running_worker(app, dataclasses.replace(settings, grace_s=0.2), keys):
        out = raw.seal(grant, {}, type_="slow_retry")
        await raw.send(out.request)
        with anyio.fail_after(10):
            await waiting.wait()
            attempt_key = raw.names.attempt(grant.sid, out.request.mid)
            while (recorded := await redis.get(attempt_key)) is None:
                await anyio.sleep(0.02)
        seen_ttl = await redis.pttl(raw.names.seen(grant.sid, out.request.mid))
        attempt_ttl = await redis.pttl(attempt_key)
    assert b"2" == recorded
    assert 2 * 600_000 < seen_ttl
    assert 0 < attempt_ttl <= seen_ttl


async def test_a_redelivery_after_a_crash_goes_on_from_the_recorded_attempt(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """A worker process killed while it waits to retry (attempt 2 recorded) leaves the
    entry pending; the worker that reclaims it runs attempt 2, not attempt 1 again."""
    procs = WorkerProcs(settings, keys, tmp_path)
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    try:
        victim = procs.start("tests.apps:retrying")
        await wait_started(redis, settings.prefix, 1)
        out = raw.seal(grant, {}, type_="flaky")
        await raw.send(out.request)
        with anyio.fail_after(30):
            while await redis.get(raw.names.attempt(grant.sid, out.request.mid)) is None:
                await anyio.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        fast = dataclasses.replace(settings, claim_idle_ms=300)
        async with running_worker(retrying, fast, keys):
            reply = await raw.reply(grant.sid, out.request.mid, timeout=20)
        assert {"attempt": 2} == open_ok(reply, out)
    finally:
        procs.kill_all()
