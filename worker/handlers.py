"""The handler registry: an :class:`App` maps a request ``type`` to a handler.

A handler is ``async def handler(payload)`` or ``async def handler(payload, ctx)``
(plain functions run in a worker thread). A payload annotated with a dataclass is
checked and built (see :mod:`worker.payloads`). It returns the reply's result, raises
:class:`~worker.errors.BadPayload` to refuse its payload, or raises anything else
for a ``handler_error`` (after its retries: see :mod:`worker.retries`).

An app also carries startup/shutdown hooks (``@app.on_startup``, ``@app.on_shutdown``:
run once per worker process, before it reads / after it drained) and middleware
around every handler call (``@app.middleware``: ``async def mw(call_next, payload,
ctx)``, applied in registration order, the first registered outermost).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from worker.logging import get_logger
from worker.payloads import Converter, payload_converter
from worker.protocol import HANDSHAKE_TYPE
from worker.retries import Backoff, RetryPolicy

F = TypeVar("F", bound=Callable[..., Any])
#: ``call_next(payload, ctx)``: the rest of the chain (the handler last).
CallNext = Callable[[Any, "Context"], Awaitable[Any]]
Middleware = Callable[[CallNext, Any, "Context"], Awaitable[Any]]
Hook = Callable[[], Awaitable[None]]
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])
_TYPE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """What a handler may know about the request beyond its payload."""

    session_id: str
    message_id: str
    type: str
    ts: int
    entry_id: str
    attempt: int

    @property
    def log(self) -> Any:
        """A structlog logger bound with ``session_id``, ``message_id`` and ``type``
        (never the payload: do not log it yourself either). Built when asked for."""
        return get_logger("sealstream.handler").bind(
            session_id=self.session_id, message_id=self.message_id, type=self.type
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerSpec:
    """A registered handler and its policy."""

    name: str
    fn: Callable[..., Any]
    timeout_s: float | None
    policy: RetryPolicy
    takes_context: bool
    is_async: bool
    convert: Converter | None = None

    @property
    def retries(self) -> int:
        """Attempts after the first one (``policy.retries``)."""
        return self.policy.retries


class App:
    """A set of handlers, keyed by request ``type``.

    ``timeout_s`` and the retry policy (``retry``, or ``retries``/``backoff``/
    ``retry_on`` over its fields) are defaults for handlers that do not set their
    own; a ``timeout_s`` of None uses the worker's ``handler_timeout_s``.
    """

    def __init__(
        self,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
        backoff: Backoff | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.timeout_s = _timeout(timeout_s)
        self.retry = _policy(retry or RetryPolicy(), retries, backoff, retry_on)
        self._handlers: dict[str, HandlerSpec] = {}
        self.middlewares: tuple[Middleware, ...] = ()
        self.startup_hooks: list[Hook] = []
        self.shutdown_hooks: list[Hook] = []

    @property
    def retries(self) -> int:
        """The default number of retries."""
        return self.retry.retries

    def handler(
        self,
        name: str | None = None,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
        backoff: Backoff | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        retry: RetryPolicy | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function for ``name`` (default: its ``__name__``)."""

        def decorate(fn: F) -> F:
            self.add(
                name or fn.__name__,
                fn,
                timeout_s=timeout_s,
                retries=retries,
                backoff=backoff,
                retry_on=retry_on,
                retry=retry,
            )
            return fn

        return decorate

    def middleware(self, fn: H) -> H:
        """Register ``async def mw(call_next, payload, ctx)`` around every handler call
        (registration order: the first registered runs outermost). It returns the
        result (``await call_next(payload, ctx)``, or its own); what it raises counts
        as the handler's failure."""
        _require_async(fn, "middleware must be an async function")
        self.middlewares = (*self.middlewares, fn)
        return fn

    def on_startup(self, fn: H) -> H:
        """Register an async hook run once per worker process before it reads; one
        that raises stops the worker (exit code 3)."""
        _require_async(fn, "startup hooks must be async functions")
        self.startup_hooks.append(fn)
        return fn

    def on_shutdown(self, fn: H) -> H:
        """Register an async hook run once per worker process after it drained
        (in reverse order of registration); failures are logged."""
        _require_async(fn, "shutdown hooks must be async functions")
        self.shutdown_hooks.append(fn)
        return fn

    def add(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
        backoff: Backoff | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Register ``fn`` for ``name``; ValueError for a bad or taken name or policy.

        ``retry`` replaces the app's default policy; ``retries``, ``backoff`` and
        ``retry_on`` override single fields of it.
        """
        if _TYPE.fullmatch(name) is None:
            raise ValueError(f"handler name {name!r} must match [A-Za-z0-9_.:-]{{1,64}}")
        if name == HANDSHAKE_TYPE or name.startswith("sealstream."):
            raise ValueError("handler names starting with 'sealstream.' are reserved")
        if name in self._handlers:
            raise ValueError(f"a handler is already registered for {name!r}")
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if not 1 <= len(params) <= 2:
            raise ValueError(f"handler {name!r} must take (payload) or (payload, ctx)")
        self._handlers[name] = HandlerSpec(
            name=name,
            fn=fn,
            timeout_s=_timeout(timeout_s) if timeout_s is not None else self.timeout_s,
            policy=_policy(retry or self.retry, retries, backoff, retry_on),
            takes_context=len(params) == 2,
            is_async=inspect.iscoroutinefunction(fn),
            convert=payload_converter(fn),
        )

    def get(self, name: str) -> HandlerSpec | None:
        """The handler for ``name``, or None."""
        return self._handlers.get(name)

    @property
    def names(self) -> list[str]:
        """Registered handler names, sorted."""
        return sorted(self._handlers)


def _policy(
    base: RetryPolicy,
    retries: int | None,
    backoff: Backoff | None,
    retry_on: tuple[type[BaseException], ...] | None,
) -> RetryPolicy:
    """``base`` with the fields that are given replaced (ValueError for bad ones)."""
    if retries is None and backoff is None and retry_on is None:
        return base
    return replace(
        base,
        retries=base.retries if retries is None else retries,
        backoff=base.backoff if backoff is None else backoff,
        retry_on=base.retry_on if retry_on is None else tuple(retry_on),
    )


def _require_async(fn: Callable[..., Any], what: str) -> None:
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(what)


#: The longest a handler may be given (a week): the replay record must outlive it.
MAX_TIMEOUT_S = 7 * 24 * 3600.0


def _timeout(timeout_s: float | None) -> float | None:
    """``timeout_s`` if it is a finite number of seconds in (0, a week]; else ValueError.

    An infinite or huge time limit would make the replay record's lifetime overflow
    and every batch holding the handler's requests fail.
    """
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
        raise ValueError("timeout_s must be a number of seconds")  # noqa: TRY004 - one error for a bad setting, as App.add documents
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s must be more than 0 and at most {MAX_TIMEOUT_S:g} s")
    return float(timeout_s)
