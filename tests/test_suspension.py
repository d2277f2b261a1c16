"""A handler that cannot suspend runs without an attempt scope; any other keeps its own.

:func:`worker.suspension.steady_code` reads a handler's bytecode once (when the
dispatcher first runs it); the dispatcher then skips the cancel scope only where
nothing could be timed out or nested. Everything that might suspend (or that the
reader cannot see into) keeps the scope, and a time limit still holds if a
handler's code changes after registration.
"""

from __future__ import annotations

import functools
import inspect
import time
import types
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from worker import App
from worker.dispatch import Dispatcher, Outcome, Work
from worker.handlers import CallNext, Context
from worker.metrics import Metrics
from worker.suspension import never_suspends


async def _returns(payload: Any) -> Any:
    return {"echo": payload}


async def _raises(payload: Any) -> Any:
    raise ValueError(payload)


async def _calls_sync_code(payload: Any) -> Any:
    with anyio.move_on_after(1):  # noqa: ASYNC100 - a sync scope, entered and left in the step
        return sorted(payload)


async def _awaits(payload: Any) -> Any:
    await anyio.lowlevel.checkpoint()
    return payload


async def _async_with(payload: Any) -> Any:
    async with anyio.Lock():
        return payload


async def _async_for(payload: Any) -> Any:
    async def gen() -> AsyncIterator[int]:
        yield 1

    return [i async for i in gen()]


async def _await_in_comprehension(payload: Any) -> Any:
    return [await anyio.to_thread.run_sync(str, x) for x in payload]


def _plain(payload: Any) -> Any:
    return payload


@types.coroutine
def _generator_based(payload: Any) -> Any:
    yield
    return payload


class _Callable:
    async def __call__(self, payload: Any) -> Any:
        return payload


def _decorated(fn: Any) -> Any:
    @functools.wraps(fn)
    async def wrapper(payload: Any) -> Any:
        return await fn(payload)

    return wrapper


@pytest.mark.parametrize("fn", [_returns, _raises, _calls_sync_code])
def test_an_async_def_without_suspension_points_never_suspends(fn: Any) -> None:
    """``async def`` code with no await, async with or async for returns at its first step."""
    assert never_suspends(fn)


@pytest.mark.parametrize(
    "fn",
    [
        _awaits,
        _async_with,
        _async_for,
        _await_in_comprehension,
        _plain,
        _generator_based,
        _Callable(),
        functools.partial(_returns),
        _decorated(_returns),
    ],
)
def test_anything_that_may_suspend_or_cannot_be_read_is_taken_to_suspend(fn: Any) -> None:
    """Awaiting code, plain functions, generator-based coroutines, callables, partials
    and wrappers all keep their attempt scope."""
    assert not never_suspends(fn)


class _Scopes:
    """Counts the attempt scopes a dispatcher makes (its scope class, wrapped)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.made = 0
        base = type(anyio.CancelScope())
        counter = self

        class Counted(base):  # type: ignore[valid-type,misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                counter.made += 1
                super().__init__(*args, **kwargs)

        dispatcher._scope_class = Counted


async def _dispatch(app: App, type_: str, payload: Any) -> tuple[Outcome, int]:
    dispatcher = Dispatcher(app, default_timeout_s=0.2, metrics=Metrics())
    scopes = _Scopes(dispatcher)
    ctx = Context(session_id="s", message_id="m", type=type_, ts=0, entry_id="1-0", attempt=1)
    work = await dispatcher.prepare(ctx, "j", b'{"a": 1}')
    assert isinstance(work, Work)
    async with anyio.create_task_group() as tg:
        tg.start_soon(dispatcher.watchdog)
        outcome = await dispatcher.run(work)
        tg.cancel_scope.cancel()
    return outcome, scopes.made


async def test_a_handler_that_cannot_suspend_runs_without_a_scope() -> None:
    """The echo shape answers ``ok`` and no cancel scope is made for it."""
    app = App()
    app.add("echo", _returns)
    outcome, made = await _dispatch(app, "echo", None)
    assert ("ok", 0) == (outcome.status, made)


async def test_a_handler_that_awaits_runs_in_its_attempt_scope() -> None:
    """A handler with an await gets its scope, as does one called through middleware."""
    awaiting = App()
    awaiting.add("nap", _awaits)
    wrapped = App()
    wrapped.add("echo", _returns)

    @wrapped.middleware
    async def passthrough(call_next: CallNext, payload: Any, ctx: Context) -> Any:
        return await call_next(payload, ctx)

    results = [await _dispatch(awaiting, "nap", None), await _dispatch(wrapped, "echo", None)]
    assert [("ok", 1), ("ok", 1)] == [(o.status, made) for o, made in results]


async def test_a_handler_whose_code_changed_after_registration_still_times_out() -> None:
    """Registered as a handler that never suspends, then given awaiting code: its time
    limit holds."""

    async def hang(payload: Any) -> Any:
        await anyio.sleep(30)

    async def quick(payload: Any) -> Any:
        return payload

    app = App()
    app.add("quick", quick, timeout_s=0.2)
    quick.__code__ = hang.__code__
    with anyio.fail_after(5):
        outcome, made = await _dispatch(app, "quick", None)
    assert ("error", "timeout", 1) == (outcome.status, outcome.code, made)


async def _scoped(payload: Any) -> Any:
    """Opens a scope of its own before it awaits (what a hot reload may swap in)."""
    with anyio.fail_after(5):
        await anyio.lowlevel.checkpoint()
        return payload


def _fresh_quick() -> Any:
    """A new never-suspending handler (each test replaces its ``__code__``)."""

    async def quick(payload: Any) -> Any:
        return payload

    return quick


async def test_code_replaced_with_a_scope_before_its_await_keeps_its_attempt_scope() -> None:
    """Given code that opens a scope of its own before it awaits (a hot reload, say),
    the handler still finds its attempt scope beneath its own: it answers ``ok`` and
    leaves the task's scopes as they were."""

    quick = _fresh_quick()
    app = App()
    app.add("quick", quick)
    quick.__code__ = _scoped.__code__
    with anyio.fail_after(5):
        outcome, made = await _dispatch(app, "quick", None)
    assert ("ok", 1) == (outcome.status, made)


async def test_code_replaced_after_a_first_call_keeps_its_attempt_scope() -> None:
    """The code read is checked at every call, not only the first."""

    quick = _fresh_quick()
    app = App()
    app.add("quick", quick)
    dispatcher = Dispatcher(app, default_timeout_s=0.2, metrics=Metrics())
    scopes = _Scopes(dispatcher)
    ctx = Context(session_id="s", message_id="m", type="quick", ts=0, entry_id="1-0", attempt=1)
    statuses = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher.watchdog)
            for _ in range(2):
                work = await dispatcher.prepare(ctx, "j", b"1")
                assert isinstance(work, Work)
                statuses.append((await dispatcher.run(work)).status)
                quick.__code__ = _scoped.__code__
            tg.cancel_scope.cancel()
    assert (["ok", "ok"], 1) == (statuses, scopes.made)


def _slow_start_app() -> App:
    """An app whose handler ``quick`` (limit 0.4 s) was registered as never suspending,
    then given code that blocks 0.3 s in its first step and sleeps 0.3 s after it."""

    async def slow_start(payload: Any) -> Any:
        time.sleep(0.3)  # noqa: ASYNC251 - CPU-bound first step, on purpose
        await anyio.sleep(0.3)
        return payload

    async def quick(payload: Any) -> Any:
        return payload

    app = App()
    app.add("quick", quick, timeout_s=0.4)
    quick.__code__ = slow_start.__code__
    return app


async def test_code_replaced_after_registration_is_timed_out_from_its_first_step() -> None:
    """The first step's time counts toward the limit, as for any other handler."""

    app = _slow_start_app()
    with anyio.fail_after(5):
        outcome, _ = await _dispatch(app, "quick", None)
    assert ("error", "timeout") == (outcome.status, outcome.code)


def test_a_coroutine_flag_on_code_that_returns_an_awaitable_is_not_read_as_an_async_def() -> None:
    """Code flagged CO_COROUTINE but not compiled as a coroutine (no RETURN_GENERATOR)
    returns whatever it returns, an awaitable that suspends included."""

    def plain(payload: Any) -> Any:
        return anyio.sleep(payload)

    code = plain.__code__.replace(co_flags=plain.__code__.co_flags | inspect.CO_COROUTINE)
    flagged = types.FunctionType(code, plain.__globals__)
    assert inspect.iscoroutinefunction(flagged)
    assert not never_suspends(flagged)


async def test_were_the_reader_wrong_the_limit_still_holds_from_the_first_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handler run unscoped that yields after all gets a scope then, with its first
    step's time counted, and leaves no deadline behind."""

    app = _slow_start_app()
    monkeypatch.setattr("worker.dispatch.steady_code", lambda fn: fn.__code__)
    dispatcher = Dispatcher(app, default_timeout_s=0.2, metrics=Metrics())
    scopes = _Scopes(dispatcher)
    ctx = Context(session_id="s", message_id="m", type="quick", ts=0, entry_id="1-0", attempt=1)
    work = await dispatcher.prepare(ctx, "j", b"1")
    assert isinstance(work, Work)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher.watchdog)
            outcome = await dispatcher.run(work)
            tg.cancel_scope.cancel()
    assert ("error", "timeout", 1, {}) == (
        outcome.status,
        outcome.code,
        scopes.made,
        dispatcher._deadlines,
    )
