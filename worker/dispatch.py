"""Running a request's handler: payload decoding, time limit, retries, the outcome.

Retries follow the handler's :class:`~worker.retries.RetryPolicy`; the wait between
attempts is slept in the handler task for now (the entry stays in flight, so the
heartbeat covers it; a task of the pool is held meanwhile).

Pure of Redis: takes an authenticated plaintext, returns an :class:`Outcome` (a
status, the reply plaintext, maybe a dead-letter reason). Nothing here raises for
what a handler does.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from worker import codec, tracing, wire
from worker.errors import BadPayload, HandlerEscaped
from worker.handlers import App, CallNext, Context, HandlerSpec, Middleware
from worker.logging import enabled as log_enabled
from worker.logging import get_logger
from worker.metrics import Metrics
from worker.payloads import to_value
from worker.suspension import steady_code
from worker.values import builder

log = get_logger("sealstream.worker")
T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What a dispatched request ends in: a status, its plaintext, maybe a dead letter."""

    status: str
    plaintext: bytes
    dead_letter: str | None = None
    code: str | None = None


_outcome = builder(Outcome)  # per message: see worker.values


def error(code: str, message: str, field: wire.Field, *, dead_letter: str | None = None) -> Outcome:
    """An ``error`` outcome with ``{code, message}``."""
    body = codec.dumps({"code": code, "message": message}, field)
    return Outcome(status="error", plaintext=body, dead_letter=dead_letter, code=code)


@dataclass(slots=True, kw_only=True)
class Work:
    """A request on its way through its handler's attempts (kept across a timeout)."""

    ctx: Context
    field: wire.Field
    spec: HandlerSpec
    payload: Any
    attempt: int = 1
    outcome: Outcome | None = None
    #: Set when another attempt is scheduled: wait ``wait_s``, persist the attempt.
    retrying: bool = False
    wait_s: float = 0.0
    #: When the replay record expires at the latest (``time.monotonic()``): the
    #: attempt record must not outlive it.
    expires_at: float = math.inf
    #: The message's OpenTelemetry span (tracing on): current while the handler runs.
    span: Any = None


class Dispatcher:
    """Runs handlers of an :class:`App` with the worker's time limits and retries."""

    def __init__(self, app: App, *, default_timeout_s: float, metrics: Metrics) -> None:
        self.app = app
        self.default_timeout_s = default_timeout_s
        self.metrics = metrics
        self._debug = log_enabled("debug")
        #: the cancel scope of every attempt running now, with its deadline
        self._deadlines: dict[anyio.CancelScope, float] = {}
        #: the running backend's cancel scope class, called directly: anyio.CancelScope()
        #: looks the backend up each time (a third of the scope's cost, measured)
        self._scope_class: type[anyio.CancelScope] | None = None
        self._decode_lane = anyio.CapacityLimiter(1)
        self._timers: dict[
            str,
            tuple[Any, CallNext | None, float, types.FunctionType | None, types.CodeType | None],
        ] = {}
        self._budgets: dict[str, int] = {}
        #: Called before a retry waits (the processor persists the attempt number).
        self.on_retry: Callable[[Work], Awaitable[None]] | None = None

    def timeout_s(self, spec: HandlerSpec) -> float:
        """The handler's time limit per attempt."""
        return spec.timeout_s if spec.timeout_s is not None else self.default_timeout_s

    def budget_ms(self, type_: str) -> int:
        """The longest a request of ``type_`` may run: its timeout x attempts plus the
        longest waits between them (ms)."""
        budget = self._budgets.get(type_)
        if budget is None:
            spec = self.app.get(type_)
            budget = 0 if spec is None else int(spec.policy.budget_s(self.timeout_s(spec)) * 1000)
            if len(self._budgets) < 10_000:  # types come from requests: bounded
                self._budgets[type_] = budget
        return budget

    async def prepare(self, ctx: Context, field: wire.Field, plaintext: bytes) -> Outcome | Work:
        """The request's handler and decoded payload, or the ``error`` it ends in."""
        spec = self.app.get(ctx.type)
        if spec is None:
            return error("unknown_type", f"no handler for type {ctx.type!r}", field)
        try:
            if len(plaintext) > codec.LARGE:  # codec.is_large, inline: the hot path
                # Bounded, but a large decode still takes milliseconds: off the loop.
                payload = await anyio.to_thread.run_sync(
                    codec.loads, plaintext, field, limiter=self._decode_lane
                )
            else:
                payload = codec.loads(plaintext, field)
        except codec.DecodeError:
            return error("bad_payload", "the payload is not a single strict value", field)
        return Work(ctx=ctx, field=field, spec=spec, payload=payload)

    async def run(self, work: Work) -> Outcome:
        """Run the remaining attempts; never raises for what the handler does.

        Each attempt runs in a cancel scope of its own, without a deadline: an
        attempt that returns without suspending (most handlers) has nothing to time
        out; one that suspends is registered with the :meth:`watchdog`, which cancels
        it once its time is up (a scope with a deadline costs about as much as an echo
        handler, measured). A cancellation stays within its attempt even if the
        handler swallows it. A handler that cannot suspend at all (an ``async def``
        with no ``await``, ``async with`` or ``async for``: :mod:`worker.suspension`),
        called without middleware, gets no scope: it has nothing to time out and no
        scope of its own to nest; while its ``__code__`` is the one read (checked at
        every call: a hot reload may replace it), else it keeps its scope.
        """
        spec, field, ctx = work.spec, work.field, work.ctx
        cached = self._timers.get(spec.name)
        if cached is None:
            chain = _chain(spec, self.app.middlewares) if self.app.middlewares else None
            timer = self.metrics.handler_seconds.labels(type=spec.name)
            # A handler that cannot suspend (worker.suspension), called without
            # middleware, runs without an attempt scope while its code is the one read.
            fn = spec.fn
            code = steady_code(fn) if chain is None else None
            steady = fn if code is not None and isinstance(fn, types.FunctionType) else None
            cached = (timer, chain, self.timeout_s(spec), steady, code)
            self._timers[spec.name] = cached
        timer, chain, timeout, steady, code = cached
        while work.attempt <= spec.policy.retries + 1:
            if work.retrying:
                await self._wait(work)
            started = time.perf_counter()
            scope = None
            try:
                attempt_ctx = ctx if ctx.attempt == work.attempt else _attempt(ctx, work.attempt)
                call = _call(spec, work.payload, attempt_ctx, chain)
                if work.span is not None:
                    call = tracing.within(work.span, call)
                try:
                    if steady is not None and steady.__code__ is code and work.span is None:
                        try:
                            yielded = call.send(None)
                        except StopIteration as done:
                            result = done.value  # returned at its first step, as it must
                        else:
                            # Not what was read (its __code__ replaced from another
                            # thread since the check?): time it out all the same, its
                            # first step included (its own scopes, if it opened any in
                            # that step, are beneath this one: only a scoped start
                            # avoids that).
                            scope = self._scope()
                            with scope:
                                elapsed = time.perf_counter() - started
                                self._deadlines[scope] = time.monotonic() + timeout - elapsed
                                result = await resume(call, yielded)
                    else:
                        # The scope is entered before the handler's first step: a
                        # handler opening scopes of its own (a task group, fail_after,
                        # a lock) must find this one beneath them.
                        scope = self._scope()
                        with scope:
                            try:
                                yielded = call.send(None)
                            except StopIteration as done:
                                result = done.value  # never suspended: nothing to time out
                            else:
                                # loop.time() of asyncio is time.monotonic(), as the
                                # watchdog's.
                                elapsed = time.perf_counter() - started
                                self._deadlines[scope] = time.monotonic() + timeout - elapsed
                                result = await resume(call, yielded)
                finally:
                    if scope is not None:
                        self._deadlines.pop(scope, None)
                    timer.observe(time.perf_counter() - started)
            except BadPayload as exc:
                return error("bad_payload", exc.message, field)
            except Exception as exc:
                # The exception text may quote the payload: log its type only.
                error_type = str(exc) if isinstance(exc, HandlerEscaped) else type(exc).__name__
                log.warning(
                    "handler_failed",
                    attempt=work.attempt,
                    error_type=error_type,
                    session_id=ctx.session_id,
                    message_id=ctx.message_id,
                )
                work.outcome = error(
                    "handler_error", "the handler failed", field, dead_letter="handler_error"
                )
                if not spec.policy.retries_on(exc):
                    return work.outcome
                self._schedule(work)
                continue
            if scope is not None and scope.cancelled_caught:
                log.warning(
                    "handler_timeout",
                    attempt=work.attempt,
                    timeout_s=timeout,
                    session_id=ctx.session_id,
                    message_id=ctx.message_id,
                )
                work.outcome = error(
                    "timeout",
                    f"the handler timed out after {timeout:g} s",
                    field,
                    dead_letter="timeout",
                )
                self._schedule(work)  # timeouts retry while attempts remain
                continue
            try:
                body = codec.dumps(result, field)
            except (TypeError, ValueError, OverflowError):
                log.warning("handler_result_unencodable", encoding=field, message_id=ctx.message_id)
                return error(
                    "handler_error",
                    "the handler's result cannot be encoded",
                    field,
                    dead_letter="handler_error",
                )
            if self._debug:
                log.debug("handler_done", ms=round((time.perf_counter() - started) * 1000, 2))
            return _outcome(status="ok", plaintext=body, dead_letter=None, code=None)
        assert work.outcome is not None  # every attempt failed, the last one said how
        return work.outcome

    def _scope(self) -> anyio.CancelScope:
        """A new cancel scope, from the running backend's class (called directly:
        ``anyio.CancelScope()`` looks the backend up each time)."""
        scope_class = self._scope_class
        if scope_class is None:
            scope_class = self._scope_class = type(anyio.CancelScope())
        return scope_class()

    def _schedule(self, work: Work) -> bool:
        """Count the failed attempt; True when another one is due (then set its wait)."""
        work.attempt += 1
        policy = work.spec.policy
        if work.attempt > policy.retries + 1:
            return False
        work.retrying = True
        work.wait_s = policy.backoff.delay_s(work.attempt - 1)
        self.metrics.retries.labels(type=work.spec.name).inc()
        return True

    async def _wait(self, work: Work) -> None:
        """Before a retry: persist its attempt number (a redelivery after a crash goes
        on from it), then wait out its backoff."""
        work.retrying = False
        if self.on_retry is not None:
            await self.on_retry(work)
        if work.wait_s > 0:
            log.info(
                "handler_retry_wait",
                attempt=work.attempt,
                wait_s=round(work.wait_s, 3),
                session_id=work.ctx.session_id,
                message_id=work.ctx.message_id,
            )
            await anyio.sleep(work.wait_s)

    async def watchdog(self, *, tick_s: float = 0.01) -> None:
        """Cancel every attempt running past its deadline, until cancelled."""
        while True:
            await anyio.sleep(tick_s)
            now = time.monotonic()
            late = [scope for scope, deadline in self._deadlines.items() if deadline <= now]
            for scope in late:
                del self._deadlines[scope]
                scope.cancel()


@types.coroutine
def resume(coro: Coroutine[Any, Any, T], yielded: Any) -> Generator[Any, Any, T]:
    """Go on running ``coro`` in this task after its first step, taken with
    ``coro.send(None)``, suspended on ``yielded``: as if it had been awaited from the
    start (what the event loop sends or throws in is passed on)."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # a cancellation, or the generator closing
            try:
                yielded = coro.throw(exc)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]


def _attempt(ctx: Context, attempt: int) -> Context:
    if ctx.attempt == attempt:
        return ctx
    return Context(
        session_id=ctx.session_id,
        message_id=ctx.message_id,
        type=ctx.type,
        ts=ctx.ts,
        entry_id=ctx.entry_id,
        attempt=attempt,
    )


def _chain(spec: HandlerSpec, middlewares: tuple[Middleware, ...]) -> CallNext:
    """The handler wrapped in ``middlewares``, the first registered outermost."""

    async def handler(payload: Any, ctx: Context) -> Any:
        if spec.convert is not None:
            payload = spec.convert(payload)
        args = (payload, ctx) if spec.takes_context else (payload,)
        if spec.is_async:
            return await spec.fn(*args)
        return await anyio.to_thread.run_sync(lambda: spec.fn(*args), abandon_on_cancel=True)

    call: CallNext = handler
    for mw in reversed(middlewares):
        call = functools.partial(mw, call)
    return call


async def _call(spec: HandlerSpec, payload: Any, ctx: Context, chain: CallNext | None) -> Any:
    """Run the handler; what it raises is its own failure, never the worker's.

    ``SystemExit``/``KeyboardInterrupt`` raised by handler code, and a cancellation
    that nobody asked of this task (a handler awaiting a future someone cancelled),
    would otherwise stop the whole worker; they become :class:`HandlerEscaped`
    (a ``handler_error``). A real cancellation (timeout, shutdown) goes through.
    ``chain`` is the handler in its middleware, when there is any (the common case,
    none, stays one call without an extra coroutine).
    """
    try:
        if chain is not None:
            return to_value(await chain(payload, ctx))
        if spec.convert is not None:
            payload = spec.convert(payload)  # BadPayload when it does not fit
        args = (payload, ctx) if spec.takes_context else (payload,)
        if spec.is_async:
            return to_value(await spec.fn(*args))
        return to_value(
            await anyio.to_thread.run_sync(lambda: spec.fn(*args), abandon_on_cancel=True)
        )
    except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
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
