"""The handler API beyond handlers, on a real Redis: middleware, startup and shutdown
hooks, and the logger bound to each request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog

from tests.helpers import Raw, open_client, open_ok
from tests.procs import WorkerProcs
from worker import App, BadPayload, Context, RemoteError, Settings
from worker.handlers import CallNext
from worker.testing import ThrowawayKeys, running_worker


async def _request(settings: Settings, keys: ThrowawayKeys, type_: str, payload: Any) -> Any:
    async with (
        open_client(settings, keys) as client,
        client.session() as session,
    ):
        return await session.request(type_, payload, timeout=20)


async def test_middleware_wraps_handlers_in_registration_order(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """The first registered middleware runs outermost, each sees the payload and the
    context, and the result passes back out through them."""
    app = App()
    seen: list[str] = []

    @app.middleware
    async def outer(call_next: CallNext, payload: Any, ctx: Context) -> Any:
        seen.append(f"outer:{ctx.type}")
        return {"outer": await call_next(payload, ctx)}

    @app.middleware
    async def inner(call_next: CallNext, payload: Any, ctx: Context) -> Any:
        seen.append(f"inner:{payload['n']}")
        return {"inner": await call_next({"n": payload["n"] + 1}, ctx)}

    @app.handler("add")
    async def add(payload: Any) -> Any:
        seen.append("handler")
        return payload["n"]

    async with running_worker(app, settings, keys):
        result = await _request(settings, keys, "add", {"n": 1})
    assert {"outer": {"inner": 2}} == result
    assert ["outer:add", "inner:1", "handler"] == seen


async def test_what_middleware_raises_is_the_handlers_failure(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """A middleware refusing with BadPayload answers bad_payload with its message; one
    raising anything else answers handler_error."""
    app = App()

    @app.middleware
    async def guard(call_next: CallNext, payload: Any, ctx: Context) -> Any:
        if payload == "refuse":
            raise BadPayload("refused by policy")
        if payload == "crash":
            raise RuntimeError("middleware bug")
        return await call_next(payload, ctx)

    @app.handler("echo")
    async def echo(payload: Any) -> Any:
        return payload

    async with running_worker(app, settings, keys):
        assert "ok" == await _request(settings, keys, "echo", "ok")
        with pytest.raises(RemoteError) as refused:
            await _request(settings, keys, "echo", "refuse")
        with pytest.raises(RemoteError) as crashed:
            await _request(settings, keys, "echo", "crash")
    assert ("bad_payload", "refused by policy") == (
        refused.value.code,
        refused.value.remote_message,
    )
    assert "handler_error" == crashed.value.code


async def test_hooks_run_once_around_the_workers_life(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Startup hooks run once before the first request, in order; shutdown hooks run
    once after the last reply was written, in reverse order."""
    app = App()
    events: list[str] = []
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()

    @app.on_startup
    async def open_pool() -> None:
        events.append("open_pool")

    @app.on_startup
    async def warm_cache() -> None:
        events.append("warm_cache")

    @app.on_shutdown
    async def close_pool() -> None:
        replies = await raw.replies(grant.sid)
        events.append(f"close_pool after {len(replies)} replies")

    @app.on_shutdown
    async def flush_cache() -> None:
        events.append("flush_cache")

    @app.handler("echo")
    async def echo(payload: Any) -> Any:
        events.append("echo")
        return payload

    async with running_worker(app, settings, keys):
        out = raw.seal(grant, 1)
        await raw.send(out.request)
        assert 1 == open_ok(await raw.reply(grant.sid, out.request.mid), out)
    assert [
        "open_pool",
        "warm_cache",
        "echo",
        "flush_cache",
        "close_pool after 1 replies",
    ] == events


def test_a_failing_startup_hook_stops_the_worker_with_exit_code_3(
    settings: Settings, keys: ThrowawayKeys, tmp_path: Path
) -> None:
    """A worker whose startup hook raises exits 3 before reading, with one error line
    naming the hook and the exception."""
    procs = WorkerProcs(settings, keys, tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "worker", "worker", "tests.apps:broken_startup"],
        env=procs.env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    err = done.stderr.decode()
    assert 3 == done.returncode
    assert "startup hook open_database failed: OSError" in err
    assert "worker_started" not in err


async def test_ctx_log_is_bound_to_the_request_and_never_the_payload(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """A handler's ``ctx.log`` lines carry session_id, message_id and type, and
    nothing of the payload unless the handler puts it there."""
    app = App()

    @app.handler("noted")
    async def noted(payload: Any, ctx: Context) -> Any:
        ctx.log.info("noted_it", attempt=ctx.attempt)
        return "fine"

    with structlog.testing.capture_logs() as lines:
        async with running_worker(app, settings, keys):
            assert "fine" == await _request(settings, keys, "noted", {"secret": "s3cr3t"})
    (line,) = [line for line in lines if line["event"] == "noted_it"]
    assert {"session_id", "message_id", "type"} <= set(line)
    assert "noted" == line["type"]
    assert "s3cr3t" not in repr(lines)


@pytest.mark.parametrize("timeout_s", [0, -1, float("inf"), float("nan"), 1e12, True])
def test_a_time_limit_that_is_not_a_finite_positive_number_is_refused(timeout_s: Any) -> None:
    """A handler's (or the app's) time limit must be a finite number of seconds in
    (0, a week]: anything else is a ValueError at registration, not a failing batch."""
    app = App()

    async def handler(payload: Any) -> Any:
        return payload

    with pytest.raises(ValueError, match="timeout_s"):
        app.add("h", handler, timeout_s=timeout_s)
    with pytest.raises(ValueError, match="timeout_s"):
        App(timeout_s=timeout_s)
    app.add("h", handler, timeout_s=2)
    assert 2.0 == app.get("h").timeout_s  # type: ignore[union-attr]
