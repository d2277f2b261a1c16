"""Handler time limits on the pool's long-lived cancel scopes, on a real Redis.

Each handler task keeps one cancel scope; a watchdog cancels it when the attempt
running in it passes its deadline. These tests pin what that must keep: a timed-out
attempt is retried or answered ``timeout``, and the same task then serves on, stray
cancellations included.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from typing import Any

import anyio
import pytest

from tests.helpers import open_client
from worker import App, RemoteError, Settings
from worker.testing import ThrowawayKeys, running_worker


def _app(calls: Counter[str]) -> App:
    app = App()

    @app.handler("hang", timeout_s=0.2, retries=1)
    async def hang(payload: Any) -> Any:
        calls["hang"] += 1
        await anyio.sleep(30)

    @app.handler("stray_cancel")
    async def stray_cancel(payload: Any) -> Any:
        calls["stray_cancel"] += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    @app.handler("nap", timeout_s=5)
    async def nap(payload: Any) -> Any:
        await anyio.sleep(0.3)  # past the other handler's limit, within its own
        return "rested"

    @app.handler("echo")
    async def echo(payload: Any) -> Any:
        return payload

    return app


async def test_one_handler_task_times_out_retries_and_serves_on(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """With a single handler task: a handler past its limit is cancelled, retried once,
    answered ``timeout``; a stray cancellation after it is still a handler_error; a
    handler slower than the first one's limit but within its own finishes."""
    calls: Counter[str] = Counter()
    settings = dataclasses.replace(settings, concurrency=1, prefetch=1)
    async with running_worker(_app(calls), settings, keys):
        async with (
            open_client(settings, keys) as client,
            client.session() as session,
        ):
            for _ in range(2):
                with anyio.fail_after(10):
                    with pytest.raises(RemoteError) as err:
                        await session.request("hang", {})
                assert "timeout" == err.value.code
                with pytest.raises(RemoteError) as err:
                    await session.request("stray_cancel", {})
                assert "handler_error" == err.value.code
                assert "rested" == await session.request("nap", {})
                assert {"a": 1} == await session.request("echo", {"a": 1})
    assert (4, 2) == (calls["hang"], calls["stray_cancel"])


def _tricky_app(calls: Counter[str], running: list[int]) -> App:
    app = App()

    @app.handler("swallow", timeout_s=0.1)
    async def swallow(payload: Any) -> Any:
        calls["swallow"] += 1
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            return "swallowed"  # a badly behaved handler: it eats its time limit
        return "slept"

    @app.handler("busy")
    async def busy(payload: Any) -> Any:
        running[0] += 1
        running[1] = max(running[1], running[0])
        try:
            await anyio.sleep(0.05)
        finally:
            running[0] -= 1
        return payload

    @app.handler("echo")
    async def echo(payload: Any) -> Any:
        return payload

    return app


async def test_a_handler_that_swallows_its_time_limit_cancels_nothing_else(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """A handler that catches the cancellation of its time limit and returns: its result
    is the reply, and the cancellation never reaches the next request on that task."""
    calls: Counter[str] = Counter()
    settings = dataclasses.replace(settings, concurrency=1, prefetch=1)
    async with running_worker(_tricky_app(calls, [0, 0]), settings, keys):
        async with (
            open_client(settings, keys) as client,
            client.session() as session,
        ):
            for i in range(3):
                assert "swallowed" == await session.request("swallow", {})
                assert {"i": i} == await session.request("echo", {"i": i})
    assert 3 == calls["swallow"]


async def test_no_more_handlers_run_at_once_than_the_concurrency(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """With concurrency 2, handlers that await never run more than two at once, though
    a batch runs its first handlers in its own task."""
    running = [0, 0]
    settings = dataclasses.replace(settings, concurrency=2, prefetch=30)
    async with running_worker(_tricky_app(Counter(), running), settings, keys):
        async with (
            open_client(settings, keys) as client,
            client.session() as session,
        ):
            async with anyio.create_task_group() as tg:
                for i in range(24):
                    tg.start_soon(session.request, "busy", {"i": i})
    assert 2 == running[1]


def _scoped_app() -> App:
    """Handlers whose first step opens anyio scopes of their own, then suspends."""
    app = App()
    lock = anyio.Lock()

    @app.handler("task_group")
    async def task_group(payload: Any) -> Any:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep, 0.01)
        return "grouped"

    @app.handler("fail_after")
    async def fail_after(payload: Any) -> Any:
        with anyio.fail_after(5):
            await anyio.sleep(0.01)
        return "in time"

    @app.handler("locked")
    async def locked(payload: Any) -> Any:
        async with lock:
            await anyio.sleep(0.01)
        return "locked"

    @app.handler("group_hang", timeout_s=0.2)
    async def group_hang(payload: Any) -> Any:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep, 30)
        return "never"

    @app.middleware
    async def bounded(call_next: Any, payload: Any, ctx: Any) -> Any:
        with anyio.move_on_after(10):
            return await call_next(payload, ctx)
        return None

    @app.handler("echo")
    async def echo(payload: Any) -> Any:
        return payload

    return app


async def test_handlers_opening_their_own_scopes_run_and_time_out(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """A handler (and a middleware) may open task groups, timeouts and locks in its
    first step: each answers, one past its limit is answered ``timeout``, and the
    worker serves on (the attempt's own scope lies beneath theirs)."""
    settings = dataclasses.replace(settings, concurrency=1, prefetch=1)
    async with running_worker(_scoped_app(), settings, keys):
        async with open_client(settings, keys) as client, client.session() as session:
            for _ in range(2):
                assert "grouped" == await session.request("task_group", {}, timeout=20)
                assert "in time" == await session.request("fail_after", {}, timeout=20)
                assert "locked" == await session.request("locked", {}, timeout=20)
            with pytest.raises(RemoteError) as err:
                await session.request("group_hang", {}, timeout=20)
            assert "timeout" == err.value.code
            assert {"still": "serving"} == await session.request(
                "echo", {"still": "serving"}, timeout=20
            )
