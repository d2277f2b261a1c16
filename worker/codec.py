"""The strict value codec: MessagePack (``e``) and JSON (``j``). Pure, no I/O.

Decoding is strict everywhere: one value and no trailing bytes, string keys only,
no duplicate keys, no NaN/Infinity, no extension types, integers never given as
bool or float, binary as raw bytes (MessagePack) or canonical padded standard
base64 (JSON). JSON is written byte for byte as JavaScript's ``JSON.stringify``.

Work per hostile input is bounded: :func:`loads` caps container lengths and
nesting, :func:`is_large` says when to decode a value off the event loop, and
:func:`read_flat_map` reads a map of at most :data:`MAX_FIELDS` scalars member by
member without building a nested value (an envelope, for :mod:`worker.wire`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable
from typing import Any, Final, Literal

import msgpack

#: An encoding, named as an entry's one field: ``e`` MessagePack, ``j`` JSON.
Field = Literal["e", "j"]
FIELDS: Final = ("e", "j")
#: nesting and container caps of a decoded value (plaintexts; an envelope is flat)
MAX_DEPTH: Final = 64
MAX_CONTAINER_LEN: Final = 100_000
#: the most members :func:`read_flat_map` reads (a request envelope has at most 11)
MAX_FIELDS: Final = 32
#: :func:`loads` of more bytes than this is worth running off the event loop
LARGE: Final = 64 * 1024


class DecodeError(ValueError):
    """A value is not strictly valid MessagePack or JSON."""


# -- strict values -----------------------------------------------------------------


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise DecodeError("map keys must be strings")
        # (a key's Unicode is checked with the whole value, by _check)
        if key in out:
            raise DecodeError("duplicate map key")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise DecodeError(f"{name} is not allowed")


_PLAIN: Final = frozenset({type(None), bool, int, bytes})


def _check(value: Any, depth: int = 0, *, text: bool = True) -> None:
    """Refuse what strict decoding forbids but the parsers let through.

    ``text=False`` skips the Unicode check of strings: MessagePack's decoder has
    already refused invalid UTF-8 (and UTF-8 cannot carry a lone surrogate).
    """
    # Dispatch on the exact type first (the hot path: every payload and result);
    # subclasses (an IntEnum, a str subclass) take the general path below.
    kind = type(value)
    if kind in _PLAIN:
        return
    if kind is str:
        if text:
            _check_text(value)
        return
    if kind is dict:
        _check_map(value, depth, text)
        return
    if kind is list or kind is tuple:
        _check_array(value, depth, text)
        return
    if kind is float:
        if not math.isfinite(value):
            raise DecodeError("NaN and Infinity are not allowed")
        return
    if depth > MAX_DEPTH:
        raise DecodeError("nested too deeply")
    if value is None or isinstance(value, bool | int | bytes):
        return
    if isinstance(value, msgpack.Timestamp):
        raise DecodeError("extension types are not allowed")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DecodeError("NaN and Infinity are not allowed")
        return
    if isinstance(value, str):
        _check_text(value)
        return
    if isinstance(value, list | tuple):
        _check_array(value, depth, text)
        return
    if isinstance(value, dict):
        _check_map(value, depth, text)
        return
    raise DecodeError(f"{type(value).__name__} values are not allowed")


def _check_text(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DecodeError("strings must be valid Unicode") from None


def _check_array(value: list[Any] | tuple[Any, ...], depth: int, text: bool) -> None:
    # The container may sit at MAX_DEPTH; its items may not sit deeper.
    if depth > MAX_DEPTH or (value and depth >= MAX_DEPTH):
        raise DecodeError("nested too deeply")
    if len(value) > MAX_CONTAINER_LEN:
        raise DecodeError("an array is over the container length limit")
    for item in value:
        _check(item, depth + 1, text=text)


def _check_map(value: dict[Any, Any], depth: int, text: bool) -> None:
    if depth > MAX_DEPTH or (value and depth >= MAX_DEPTH):
        raise DecodeError("nested too deeply")
    if len(value) > MAX_CONTAINER_LEN:
        raise DecodeError("a map is over the container length limit")
    for key, item in value.items():
        if type(key) is not str:
            if not isinstance(key, str):
                raise DecodeError("map keys must be strings")
        if text:
            _check_text(key)
        _check(item, depth + 1, text=text)


def loads(raw: bytes, field: Field) -> Any:
    """Decode one strict MessagePack (``e``) or JSON (``j``) value; raise DecodeError.

    Arrays and maps hold at most :data:`MAX_CONTAINER_LEN` items and nest at most
    :data:`MAX_DEPTH` deep. The work is linear in ``len(raw)`` but builds every
    value: see :func:`is_large`.
    """
    try:
        if field == "e":
            # A header over the caps is refused before its items are read; nesting
            # past the C unpacker's stack is a StackError (a ValueError).
            value = msgpack.unpackb(
                raw,
                raw=False,
                strict_map_key=False,
                object_pairs_hook=_pairs,
                ext_hook=refuse_ext,
                timestamp=0,
                max_array_len=MAX_CONTAINER_LEN,
                max_map_len=MAX_CONTAINER_LEN,
            )
        else:
            value = json.loads(
                raw.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_no_constant
            )
    except DecodeError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.ExtraData) as exc:
        kind = "MessagePack" if field == "e" else "JSON"
        raise DecodeError(f"not a single strict {kind} value") from exc
    _check(value, text=field != "e")
    return value


def refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError("extension types are not allowed")


def is_large(raw: bytes) -> bool:
    """Whether :func:`loads` of ``raw`` may take long enough to block an event loop.

    A value of up to :data:`LARGE` bytes decodes in well under a millisecond
    whatever its shape; a larger one (up to a MiB of tiny nested values) can take
    hundreds of milliseconds, so callers run it in a worker thread.
    """
    return len(raw) > LARGE


def dumps(value: Any, field: Field) -> bytes:
    """Encode a value as MessagePack (``e``) or compact UTF-8 JSON (``j``).

    Only what strict decoding accepts is written (string keys, no NaN, ...); tuples
    go out as arrays. JSON is written byte for byte as JavaScript's
    ``JSON.stringify`` does: no spaces, non-ASCII as is, numbers as JavaScript
    prints them (``1.0`` as ``1``, ``1e-7``). Raises ``TypeError``/``ValueError`` for
    what the encoding cannot carry (bytes in JSON, NaN, non-string keys).
    """
    _check(value)
    if field == "e":
        return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
    out: list[str] = []
    _write_json(value, out)
    return "".join(out).encode("utf-8")


def _write_json(value: Any, out: list[str]) -> None:
    # ``value`` has passed _check: only the types below occur.
    if isinstance(value, str):
        out.append(_json_string(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(js_number(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            out.append(_json_string(key))
            out.append(":")
            _write_json(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write_json(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(value).__name__} values cannot be written as JSON")


def _json_string(text: str) -> str:
    # The same escapes as JSON.stringify: quote, backslash, control characters.
    return json.dumps(text, ensure_ascii=False)


def js_number(x: float) -> str:
    """A finite float as JavaScript's ``Number.prototype.toString`` writes it.

    Both Python's ``repr`` and JavaScript pick the shortest digit string that reads
    back as the same double; only the layout differs (ECMA-262 Number::toString).
    """
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    mantissa, _, exp = repr(abs(x)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    stripped = digits.rstrip("0")
    # abs(x) = int(stripped) * 10 ** (n - k), with k digits
    k = len(stripped)
    n = (int(exp) if exp else 0) - len(frac) + (len(digits) - k) + k
    if k <= n <= 21:
        text = stripped + "0" * (n - k)
    elif 0 < n <= 21:
        text = stripped[:n] + "." + stripped[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + stripped
    else:
        e = n - 1
        head = stripped if k == 1 else stripped[0] + "." + stripped[1:]
        text = f"{head}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + text


def b64encode(data: bytes) -> str:
    """Canonical standard base64 with padding."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    """Decode canonical standard base64 (padding, no whitespace, no stray bits)."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise DecodeError("not canonical base64") from None
    if base64.b64encode(data).decode("ascii") != text:
        raise DecodeError("not canonical base64")
    return data


def binary(value: Any, field: Field) -> bytes:
    """A binary value as its encoding carries it: bytes (``e``) or base64 (``j``)."""
    if field == "e":
        if not isinstance(value, bytes):
            raise DecodeError("expected binary")
        return value
    if not isinstance(value, str):
        raise DecodeError("expected a base64 string")
    return b64decode(value)


def to_wire_binary(data: bytes, field: Field) -> bytes | str:
    """Binary for the given encoding: raw bytes (``e``) or base64 text (``j``)."""
    return data if field == "e" else b64encode(data)


def is_int(value: Any) -> bool:
    """An integer that is not a bool (floats never count)."""
    return isinstance(value, int) and not isinstance(value, bool)


# -- a flat map (an envelope), read in bounded work -------------------------------
#
# An envelope is a map of scalars. Parsing a whole hostile value first (a MiB of
# empty maps is a million dicts, ~0.7 s) would stall the event loop, so the reader
# looks at the top-level members only. Strictness is the same as loads's.

#: an entry up to this size may be parsed in full (about 1 ms at worst), so that
#: a strictness violation inside a nested value is refused (no ids) as loads would
SMALL: Final = 2 * 1024
_NESTED: Final = object()  # stands for a nested value the reader did not build
_CONTAINERS: Final = (dict, list)  # a tuple: cheaper in isinstance than dict | list
_MP_STR: Final = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])
_MP_CONTAINER: Final = frozenset([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_MP_EXT: Final = frozenset([0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8])
# The json module's own C helpers (typeshed does not list them): its whitespace,
# strict string scanner and scalar scanner, so the grammar is exactly json.loads's.
_ws: Callable[[str, int], re.Match[str]] = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]
_scanstring: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_scan_value: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(  # type: ignore[attr-defined]
    parse_constant=_no_constant
).scan_once


def read_flat_map(raw: bytes, field: Field) -> tuple[dict[str, Any], bool]:
    """An envelope's members and whether all of them are scalars; raise DecodeError.

    DecodeError means the entry is not a strict map of at most MAX_FIELDS members
    (it carries no ids). A nested member makes the map non-flat: its value is
    ``_NESTED`` (MessagePack, skipped without building it) or, in a small entry,
    the value a full strict parse built; a large JSON entry with a nested member
    is a DecodeError, since a JSON value cannot be skipped without parsing it.
    """
    try:
        if field == "e":
            env, flat = _msgpack_envelope(raw)
        else:
            env, flat = _json_envelope(raw)
    except DecodeError:
        raise
    except (ValueError, msgpack.UnpackException) as exc:
        kind = "MessagePack" if field == "e" else "JSON"
        raise DecodeError(f"not a single strict {kind} value") from exc
    return env, flat


def _parsed_map(value: Any) -> tuple[dict[str, Any], bool]:
    """A fully parsed envelope's members and whether all of them are scalars."""
    if type(value) is not dict:
        raise DecodeError("the envelope must be a map")
    if len(value) > MAX_FIELDS:
        raise DecodeError(f"the envelope has more than {MAX_FIELDS} fields")
    for item in value.values():
        if isinstance(item, _CONTAINERS):
            return value, False
    return value, True


def _msgpack_envelope(raw: bytes) -> tuple[dict[str, Any], bool]:
    if len(raw) <= SMALL:
        # Bounded work for a full parse (few bytes), and three times faster than the
        # member reader: the common case of a small payload.
        return _parsed_map(loads(raw, "e"))
    unpacker = msgpack.Unpacker(raw=False, ext_hook=refuse_ext, timestamp=0)
    unpacker.feed(raw)
    size = unpacker.read_map_header()  # ValueError unless a map
    if size > MAX_FIELDS:
        raise DecodeError(f"the envelope has more than {MAX_FIELDS} fields")
    env: dict[str, Any] = {}
    flat = True
    for _ in range(size):
        if _mp_type(raw, unpacker.tell()) not in _MP_STR:
            raise DecodeError("map keys must be strings")
        key = unpacker.unpack()  # strict UTF-8: no surrogates
        if key in env:
            raise DecodeError("duplicate map key")
        kind = _mp_type(raw, unpacker.tell())
        if kind in _MP_CONTAINER:
            unpacker.skip()  # C speed, builds nothing; too deep is a StackError
            env[key] = _NESTED
            flat = False
        elif kind in _MP_EXT:
            raise DecodeError("extension types are not allowed")
        else:
            value = unpacker.unpack()
            if isinstance(value, float) and not math.isfinite(value):
                raise DecodeError("NaN and Infinity are not allowed")
            env[key] = value
    if unpacker.tell() != len(raw):
        raise DecodeError("trailing bytes after the envelope")
    if not flat and len(raw) <= SMALL:
        loads(raw, "e")  # strictness inside the nested values, as before
    return env, flat


def _mp_type(raw: bytes, at: int) -> int:
    if at >= len(raw):
        raise DecodeError("truncated MessagePack")
    return raw[at]


def _json_envelope(raw: bytes) -> tuple[dict[str, Any], bool]:
    if len(raw) <= SMALL or _json_flat_and_short(raw):
        # Bounded work for a full parse: few bytes, or no nested value and at most
        # MAX_FIELDS members. The fastest path, and every valid envelope's.
        return _parsed_map(loads(raw, "j"))
    return _scan_json(raw)


def _json_flat_and_short(raw: bytes) -> bool:
    # Whether the bytes cannot hold a nested value (one "{" and no "[", counting
    # those inside strings too) nor more than MAX_FIELDS members (their commas).
    first = raw.find(b"{")
    return b"[" not in raw and raw.find(b"{", first + 1) == -1 and raw.count(b",") < MAX_FIELDS


def _scan_json(raw: bytes) -> tuple[dict[str, Any], bool]:
    # The top-level members one by one with the json module's C helpers, in the
    # grammar of json.loads (whitespace, strings, scalars). A nested value cannot
    # be skipped without parsing it: the entry is refused where one starts.
    text = raw.decode("utf-8")
    at = _ws(text, 0).end()
    if text[at : at + 1] != "{":
        raise DecodeError("the envelope must be a map")
    env: dict[str, Any] = {}
    at = _ws(text, at + 1).end()
    if text[at : at + 1] == "}":
        at += 1
    else:
        while True:
            if text[at : at + 1] != '"':
                raise DecodeError("expected a string key")
            key, at = _scanstring(text, at + 1, True)
            _check(key)
            if key in env:
                raise DecodeError("duplicate map key")
            if len(env) == MAX_FIELDS:
                raise DecodeError(f"the envelope has more than {MAX_FIELDS} fields")
            at = _ws(text, at).end()
            if text[at : at + 1] != ":":
                raise DecodeError("expected ':'")
            at = _ws(text, at + 1).end()
            if text[at : at + 1] in ("[", "{"):
                raise DecodeError("the envelope must be a flat map")
            try:
                env[key], at = _scan_value(text, at)
            except StopIteration:
                raise DecodeError("expected a value") from None
            _check(env[key])
            at = _ws(text, at).end()
            if text[at : at + 1] == ",":
                at = _ws(text, at + 1).end()
            elif text[at : at + 1] == "}":
                at += 1
                break
            else:
                raise DecodeError("expected ',' or '}'")
    if _ws(text, at).end() != len(text):
        raise DecodeError("trailing data after the envelope")
    return env, True


def dumps_unchecked(env: dict[str, Any], field: Field) -> bytes:
    """An envelope :mod:`worker.wire` built (str, int and bytes values only): no check walk."""
    if field == "e":
        return msgpack.packb(env, use_bin_type=True)  # type: ignore[no-any-return]
    out: list[str] = []
    _write_json(env, out)
    return "".join(out).encode("utf-8")
