"""Typed payloads: a handler whose payload parameter is annotated with a dataclass
receives an instance of it, checked strictly; a dataclass result is sent as a map.

Supported annotations: dataclasses (nested too), ``int``, ``float`` (an int is
accepted), ``str``, ``bytes``, ``bool``, ``None``, ``Any``, ``list[T]``,
``dict[str, T]``, ``T | None`` and other unions, ``Literal[...]``. Anything else is
refused when the handler is registered. A payload that does not fit raises
:class:`~worker.errors.BadPayload` naming the offending path (``bad_payload``).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from worker.errors import BadPayload

Converter = Callable[[Any], Any]
_SCALARS: tuple[type, ...] = (str, bytes, bool)


def payload_converter(fn: Callable[..., Any]) -> Converter | None:
    """A converter for ``fn``'s first parameter when it is a dataclass, else None.

    Raises ValueError for an annotation this module cannot check.
    """
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError) as exc:
        raise ValueError(f"cannot resolve the annotations of {fn.__name__}: {exc}") from None
    hint = hints.get(params[0].name)
    if hint is None or not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
        return None
    _check_supported(hint, set())
    return lambda value: from_value(hint, value)


def from_value(tp: Any, value: Any, path: str = "payload") -> Any:
    """``value`` checked against (and, for dataclasses, built into) ``tp``."""
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return from_value(option, value, path)
            except BadPayload:
                continue
        raise BadPayload(f"{path}: expected {_name(tp)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise BadPayload(f"{path}: expected one of {list(args)!r}")
    if origin is list:
        if not isinstance(value, list):
            raise BadPayload(f"{path}: expected a list")
        return [from_value(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BadPayload(f"{path}: expected a map")
        return {k: from_value(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise BadPayload(f"{path}: expected null")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise BadPayload(f"{path}: expected an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise BadPayload(f"{path}: expected a number")
    if tp in _SCALARS:
        if isinstance(value, tp):
            return value
        raise BadPayload(f"{path}: expected {tp.__name__}")
    raise BadPayload(f"{path}: cannot check {_name(tp)}")  # refused at registration


def to_value(result: Any) -> Any:
    """A dataclass result as a map (recursively); anything else unchanged."""
    t = type(result)  # the common results, returned without a look (by identity)
    if t is dict or t is list or t is str or t is int or t is bytes or result is None:
        return result
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    return result


def _dataclass(tp: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise BadPayload(f"{path}: expected a map")
    hints = typing.get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise BadPayload(f"{path}: unknown field {unknown[0]!r}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = from_value(hints[name], value[name], f"{path}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BadPayload(f"{path}: missing field {name!r}")
    return tp(**kwargs)


def _check_supported(tp: Any, seen: set[type]) -> None:
    if tp is Any or tp is None or tp is type(None) or tp in (int, float, *_SCALARS):
        return
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp in seen:
            return
        seen.add(tp)
        for hint in typing.get_type_hints(tp).values():
            _check_supported(hint, seen)
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType, list):
        for a in args:
            _check_supported(a, seen)
        return
    if origin is dict and args and args[0] is str:
        _check_supported(args[1], seen)
        return
    if origin is Literal:
        return
    raise ValueError(f"payload annotation {_name(tp)} is not supported")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)
