"""Whether a handler can suspend, read once from its bytecode.

A coroutine suspends only at an ``await``, ``async with`` or ``async for`` of its own
code, and CPython compiles each of them to a ``YIELD_VALUE`` (with ``SEND`` and
``GET_AWAITABLE`` or ``GET_ANEXT`` around it) in that code object; an ``await`` in a
comprehension is awaited by the enclosing code the same way. An ``async def`` with
none of these returns at its first step, so it can neither time out nor leave a
cancel scope of its own open across a suspension: the dispatcher runs it without an
attempt scope (:mod:`worker.dispatch`; ~3 µs a message, measured).

Anything else is taken to suspend: plain functions, partials, bound methods, objects
with ``__call__``, generator-based coroutines, wrappers (a decorator's ``wrapper``
awaits the function it wraps: its own code is what runs, and is what is read), code
flagged ``CO_COROUTINE`` that was not compiled as one (no ``RETURN_GENERATOR``: it
returns whatever it returns, an awaitable that suspends included).

What is read is one code object: a function's ``__code__`` may be replaced later (a
hot reload), so :func:`steady_code` returns the object it read, for the dispatcher
to check that it is still the one that runs.
"""

from __future__ import annotations

import dis
import inspect
import types
from collections.abc import Callable
from typing import Any, Final

#: Opcodes around any suspension point (``await``, ``async with``, ``async for``).
_SUSPENDING: Final = frozenset(
    {
        "YIELD_VALUE",
        "SEND",
        "GET_AWAITABLE",
        "BEFORE_ASYNC_WITH",
        "GET_AITER",
        "GET_ANEXT",
        "END_ASYNC_FOR",
    }
)


def never_suspends(fn: Callable[..., Any]) -> bool:
    """True only for an ``async def`` function whose own code has no suspension point."""
    return steady_code(fn) is not None


def steady_code(fn: Callable[..., Any]) -> types.CodeType | None:
    """The code of ``fn``, read now, when it is an ``async def`` with no suspension
    point; None otherwise."""
    if not isinstance(fn, types.FunctionType):
        return None
    code = fn.__code__  # read once: what is checked is what is returned
    if not code.co_flags & inspect.CO_COROUTINE:
        return None
    names = {ins.opname for ins in dis.get_instructions(code)}
    # Every generator or coroutine code object makes its generator with
    # RETURN_GENERATOR (CPython >= 3.11); the flag alone does not.
    if "RETURN_GENERATOR" not in names or not names.isdisjoint(_SUSPENDING):
        return None
    return code
