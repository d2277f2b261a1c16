"""The handler registry: an :class:`App` maps a request ``type`` to a handler.

A handler is ``async def handler(payload)`` or ``async def handler(payload, ctx)``
(plain functions run in a worker thread). A payload annotated with a dataclass is
checked and built (see :mod:`worker.payloads`). It returns the reply's result, raises
:class:`~worker.errors.BadPayload` to refuse its payload, or raises anything else
for a ``handler_error`` (after its retries).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from worker.envelope import HANDSHAKE_TYPE
from worker.payloads import Converter, payload_converter

F = TypeVar("F", bound=Callable[..., Any])
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


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerSpec:
    """A registered handler and its policy."""

    name: str
    fn: Callable[..., Any]
    timeout_s: float | None
    retries: int
    takes_context: bool
    is_async: bool
    convert: Converter | None = None


class App:
    """A set of handlers, keyed by request ``type``.

    ``timeout_s`` and ``retries`` are defaults for handlers that do not set their
    own; a ``timeout_s`` of None uses the worker's ``handler_timeout_s``.
    """

    def __init__(self, *, timeout_s: float | None = None, retries: int = 0) -> None:
        self.timeout_s = timeout_s
        self.retries = retries
        self._handlers: dict[str, HandlerSpec] = {}

    def handler(
        self, name: str | None = None, *, timeout_s: float | None = None, retries: int | None = None
    ) -> Callable[[F], F]:
        """Register the decorated function for ``name`` (default: its ``__name__``)."""

        def decorate(fn: F) -> F:
            self.add(name or fn.__name__, fn, timeout_s=timeout_s, retries=retries)
            return fn

        return decorate

    def add(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> None:
        """Register ``fn`` for ``name``; ValueError for a bad or taken name."""
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
            timeout_s=timeout_s if timeout_s is not None else self.timeout_s,
            retries=retries if retries is not None else self.retries,
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
