"""The envelope schema: stream entries <-> validated envelopes. Pure, no I/O.

An entry has exactly one field: ``e`` (MessagePack map) or ``j`` (UTF-8 JSON
object), decoded strictly by :mod:`worker.codec`. A request or reply envelope is
a flat map of at most :data:`~worker.codec.MAX_FIELDS` scalars, read member by
member (:func:`~worker.codec.read_flat_map`), then checked field by field before
any cryptography: the protocol's fields, types, ids and sizes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

# Field and FIELDS belong to the schema too (an entry's field is named by its encoding).
from worker.codec import FIELDS as FIELDS
from worker.codec import (
    SMALL,
    DecodeError,
    b64encode,
    binary,
    dumps_unchecked,
    is_int,
    read_flat_map,
    refuse_ext,
    to_wire_binary,
)
from worker.codec import Field as Field
from worker.errors import Malformed, ProtocolError, Unsupported
from worker.protocol import ALG_RSA, ALG_SK, ALGORITHMS, HANDSHAKE_TYPE, IV_SIZE, TAG_SIZE, VERSION
from worker.values import builder

DEFAULT_MAX_SIZE: Final = 1024 * 1024
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TYPE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
STATUSES: Final = frozenset({"ok", "error", "rejected"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """A validated request envelope (nothing is authenticated yet)."""

    field: Field
    alg: str
    sid: str
    mid: str
    ts: int
    type: str
    iv: bytes
    encrypted_data: bytes
    auth_tag: bytes
    encrypted_aes_key: bytes | None = None
    kid: str | None = None

    @property
    def is_handshake(self) -> bool:
        """Whether this is a ``sealstream.handshake`` request."""
        return self.type == HANDSHAKE_TYPE


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """A reply envelope: ``ok``/``error`` carry ciphertext, ``rejected`` a ``code``."""

    field: Field
    sid: str
    mid: str
    status: str
    alg: str | None = None
    iv: bytes | None = None
    encrypted_data: bytes | None = None
    auth_tag: bytes | None = None
    code: str | None = None


# -- ids and types -----------------------------------------------------------------


def is_id(value: Any) -> bool:
    """Whether ``value`` is a well-formed ``sid``/``mid``: 32 lowercase hex chars."""
    return isinstance(value, str) and _HEX32.fullmatch(value) is not None


def is_type(value: Any) -> bool:
    """Whether ``value`` is a well-formed handler ``type``."""
    return isinstance(value, str) and _TYPE.fullmatch(value) is not None


# -- entries -----------------------------------------------------------------------


def entry_size(fields: Mapping[bytes, bytes]) -> int:
    """The entry's total bytes of field names and values."""
    return sum(len(k) + len(v) for k, v in fields.items())


def entry_field(fields: Mapping[bytes, bytes]) -> Field | None:
    """The entry's one field name, or None unless it has exactly one named ``e``/``j``."""
    if len(fields) != 1:
        return None
    (name,) = fields
    if name == b"e":
        return "e"
    if name == b"j":
        return "j"
    return None


_COMMON = frozenset({"v", "alg", "sid", "mid", "ts", "type", "iv", "encryptedData", "authTag"})


def decode_request(fields: Mapping[bytes, bytes], *, max_size: int = DEFAULT_MAX_SIZE) -> Request:
    """Validate and decode a request entry, before any cryptography.

    Raises :class:`Malformed` or :class:`Unsupported`; the error carries
    ``session_id``/``message_id`` (and ``field``, ``alg``, ``type``) when the entry
    decoded to a map where they are well formed, so a notice can be sent.
    """
    fast = _fast_request(fields, max_size)
    return fast if fast is not None else _decode_request(fields, max_size)


def _decode_request(fields: Mapping[bytes, bytes], max_size: int) -> Request:
    """:func:`decode_request`'s full path: every entry, every error."""
    field = entry_field(fields)
    if field is None:
        raise _refuse(Malformed("the entry must have exactly one field, e or j"), keep=False)
    if entry_size(fields) > max_size:
        raise _refuse(Malformed("the entry is over the size limit"), keep=False)
    try:
        env, flat = read_flat_map(fields[field.encode()], field)
    except DecodeError as exc:
        raise _refuse(Malformed(str(exc)), field=field) from None
    sid, mid = env.get("sid"), env.get("mid")
    ctx: dict[str, Any] = {
        "field": field,
        "session_id": sid if is_id(sid) else None,
        "message_id": mid if is_id(mid) else None,
        "type_": env.get("type") if is_type(env.get("type")) else None,
    }
    alg = env.get("alg")
    if isinstance(alg, str) and alg in ALGORITHMS:
        ctx["alg"] = alg
    if not flat:
        raise _refuse(Malformed("the envelope must be a flat map"), **ctx)
    # A missing field or a wrong type is malformed; a well-typed value we do not
    # speak is unsupported.
    if not is_int(env.get("v")):
        raise _refuse(Malformed("v must be an integer"), **ctx)
    if not isinstance(alg, str):
        raise _refuse(Malformed("alg must be a string"), **ctx)
    if env["v"] != VERSION:
        raise _refuse(Unsupported("unsupported version"), **ctx)
    if alg not in ALGORITHMS:
        raise _refuse(Unsupported("unsupported alg"), **ctx)
    handshake = env.get("type") == HANDSHAKE_TYPE
    expected = set(_COMMON)
    if alg == ALG_RSA:
        expected.add("encryptedAesKey")
    if handshake:
        expected.add("kid")
    if set(env) != expected:
        missing, unknown = _names(expected - set(env)), _names(set(env) - expected)
        raise _refuse(Malformed(f"fields: missing {missing}, unknown {unknown}"), **ctx)
    if handshake and alg != ALG_RSA:
        raise _refuse(Malformed(f"a handshake must use {ALG_RSA}"), **ctx)
    if ctx["session_id"] is None or ctx["message_id"] is None:
        raise _refuse(Malformed("sid and mid must be 32 lowercase hex characters"), **ctx)
    if ctx["type_"] is None:
        raise _refuse(Malformed("type is not well formed"), **ctx)
    ts = env["ts"]
    if not is_int(ts):
        # Any integer is well formed; one far from the entry's time is ``expired``.
        raise _refuse(Malformed("ts must be an integer of milliseconds"), **ctx)
    kid = env.get("kid")
    if handshake and (not isinstance(kid, str) or _HEX64.fullmatch(kid) is None):
        raise _refuse(Malformed("kid must be 64 lowercase hex characters"), **ctx)
    try:
        iv = binary(env["iv"], field)
        data = binary(env["encryptedData"], field)
        tag = binary(env["authTag"], field)
        wrapped = binary(env["encryptedAesKey"], field) if alg == ALG_RSA else None
    except DecodeError as exc:
        raise _refuse(Malformed(str(exc)), **ctx) from None
    if len(iv) != IV_SIZE or len(tag) != TAG_SIZE:
        raise _refuse(Malformed("iv must be 12 bytes and authTag 16 bytes"), **ctx)
    return Request(
        field=field,
        alg=alg,
        sid=ctx["session_id"],
        mid=ctx["message_id"],
        ts=ts,
        type=env["type"],
        iv=iv,
        encrypted_data=data,
        auth_tag=tag,
        encrypted_aes_key=wrapped,
        kid=kid if handshake else None,
    )


_SK_KEYS: Final = frozenset(_COMMON)
_RSA_KEYS: Final = frozenset({*_COMMON, "encryptedAesKey"})
#: fixmap headers of 9 and 10 members: the SK and RSA requests (not handshakes)
_RSA_HEADER: Final = 0x8A
_FAST_HEADERS: Final = {0x89: _SK_KEYS, _RSA_HEADER: _RSA_KEYS}


def _envelope_only(keys: frozenset[str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """An ``object_hook`` passing a flat map with exactly ``keys``, stopping at any other
    (the parse builds at most one chain of small maps: see :func:`_fast_request`)."""

    def hook(value: dict[str, Any]) -> dict[str, Any]:
        if value.keys() != keys:
            raise ValueError("not an envelope")
        for item in value.values():
            if type(item) is dict:
                raise ValueError("not a flat map")
        return value

    return hook


_ENVELOPE_ONLY: Final = {header: _envelope_only(keys) for header, keys in _FAST_HEADERS.items()}
_request: Final = builder(Request)  # the fast path's: see worker.values
_fullmatch_id = _HEX32.fullmatch
_fullmatch_type = _TYPE.fullmatch


def _fast_request(fields: Mapping[bytes, bytes], max_size: int) -> Request | None:
    """The common case in a few microseconds, or None for the full path.

    Accepts only a MessagePack ``e`` entry holding exactly the members of an SK or
    RSA request (not a handshake), each of its exact type and form: what
    :func:`decode_request` accepts too, so the result is the same. Anything else
    (JSON, an odd entry, any doubt) returns None and the full path decodes it, with
    its precise errors. Duplicate keys collapse in the decoded map, so its size is
    compared with the header's.

    An entry over ``SMALL`` is parsed in bounded work whatever it holds: an array
    is refused at its header, as is a map of more members than the envelope has,
    and the first map completed that is not a flat envelope (a nested one: the
    innermost completes first) stops the parse, so no more than one chain of small
    maps is ever built (the full path's reader skips nested values without building
    them; a whole hostile parse could build a dict a byte).
    """
    if len(fields) != 1:
        return None
    raw = fields.get(b"e")
    if raw is None or len(raw) + 1 > max_size or not raw:
        return None
    expected = _FAST_HEADERS.get(raw[0])
    if expected is None:
        return None
    try:
        if len(raw) <= SMALL:
            env = msgpack.unpackb(raw, raw=False, ext_hook=refuse_ext, timestamp=0)
        else:
            env = msgpack.unpackb(
                raw,
                raw=False,
                ext_hook=refuse_ext,
                timestamp=0,
                max_array_len=0,
                max_map_len=len(expected),
                object_hook=_ENVELOPE_ONLY[raw[0]],
            )
    except Exception:
        return None
    if type(env) is not dict or env.keys() != expected:
        return None
    v, alg, sid, mid, ts, type_ = (
        env["v"], env["alg"], env["sid"], env["mid"], env["ts"], env["type"],
    )  # fmt: skip
    iv, data, tag = env["iv"], env["encryptedData"], env["authTag"]
    rsa = raw[0] == _RSA_HEADER  # the members are those of an RSA request
    wrapped = env["encryptedAesKey"] if rsa else None
    if (
        type(v) is not int
        or v != VERSION
        or alg != (ALG_RSA if rsa else ALG_SK)
        or type(ts) is not int
        or type(sid) is not str
        or type(mid) is not str
        or type(type_) is not str
        or _fullmatch_id(sid) is None
        or _fullmatch_id(mid) is None
        or _fullmatch_type(type_) is None
        or type_ == HANDSHAKE_TYPE
        or type(iv) is not bytes
        or type(data) is not bytes
        or type(tag) is not bytes
        or len(iv) != IV_SIZE
        or len(tag) != TAG_SIZE
        or (rsa and type(wrapped) is not bytes)
    ):
        return None
    return _request(
        field="e",
        alg=alg,
        sid=sid,
        mid=mid,
        ts=ts,
        type=type_,
        iv=iv,
        encrypted_data=data,
        auth_tag=tag,
        encrypted_aes_key=wrapped,
        kid=None,
    )


_NAMES_SHOWN: Final = 3
_NAME_CHARS: Final = 32


def _names(names: set[str]) -> str:
    """Field names for a log line: at most 3, each cut to 32 characters, escaped."""
    shown = sorted(names)[:_NAMES_SHOWN]
    text = ", ".join(repr(n if len(n) <= _NAME_CHARS else n[:_NAME_CHARS] + "…") for n in shown)
    more = f" (+{len(names) - len(shown)} more)" if len(names) > len(shown) else ""
    return f"[{text}]{more}"


def _refuse(
    error: ProtocolError,
    *,
    keep: bool = True,
    field: Field | None = None,
    session_id: str | None = None,
    message_id: str | None = None,
    alg: str | None = None,
    type_: str | None = None,
) -> ProtocolError:
    error.keep_original = keep
    error.field = field
    error.session_id = session_id
    error.message_id = message_id
    error.alg = alg
    error.type = type_
    return error


def encode_request(request: Request) -> dict[str, bytes]:
    """A request envelope as a stream entry ``{field: bytes}``."""
    f = request.field
    env: dict[str, Any] = {
        "v": VERSION,
        "alg": request.alg,
        "sid": request.sid,
        "mid": request.mid,
        "ts": request.ts,
        "type": request.type,
        "iv": to_wire_binary(request.iv, f),
        "encryptedData": to_wire_binary(request.encrypted_data, f),
        "authTag": to_wire_binary(request.auth_tag, f),
    }
    if request.encrypted_aes_key is not None:
        env["encryptedAesKey"] = to_wire_binary(request.encrypted_aes_key, f)
    if request.kid is not None:
        env["kid"] = request.kid
    return {f: dumps_unchecked(env, f)}


def encode_reply(reply: Reply) -> dict[str, bytes]:
    """A reply envelope as a stream entry ``{field: bytes}``."""
    if reply.status != "rejected":
        assert reply.iv is not None and reply.encrypted_data is not None
        assert reply.auth_tag is not None
    return encode_reply_fields(
        reply.field,
        alg=reply.alg,
        sid=reply.sid,
        mid=reply.mid,
        status=reply.status,
        iv=reply.iv,
        encrypted_data=reply.encrypted_data,
        auth_tag=reply.auth_tag,
        code=reply.code,
    )


def encode_reply_fields(
    f: Field,
    *,
    alg: str | None,
    sid: str,
    mid: str,
    status: str,
    iv: bytes | None = None,
    encrypted_data: bytes | None = None,
    auth_tag: bytes | None = None,
    code: str | None = None,
) -> dict[str, bytes]:
    """:func:`encode_reply` of the reply with these members, without building it."""
    env: dict[str, Any] = {"v": VERSION}
    if alg is not None:
        env["alg"] = alg
    env["sid"], env["mid"], env["status"] = sid, mid, status
    if status == "rejected":
        env["code"] = code
    elif f == "e":
        env["iv"], env["encryptedData"], env["authTag"] = iv, encrypted_data, auth_tag
    else:
        env["iv"] = b64encode(iv or b"")
        env["encryptedData"] = b64encode(encrypted_data or b"")
        env["authTag"] = b64encode(auth_tag or b"")
    return {f: dumps_unchecked(env, f)}


def decode_reply(fields: Mapping[bytes, bytes], *, max_size: int = DEFAULT_MAX_SIZE) -> Reply:
    """Strictly decode a reply entry (client side); raise :class:`Malformed`."""
    field = entry_field(fields)
    if field is None or entry_size(fields) > max_size:
        raise Malformed("not a reply entry")
    try:
        env, flat = read_flat_map(fields[field.encode()], field)
    except DecodeError as exc:
        raise Malformed(str(exc)) from None
    if not flat:
        raise Malformed("the envelope must be a flat map")
    if not is_int(env.get("v")) or env["v"] != VERSION:
        raise Malformed("not a version 1 reply")
    status = env.get("status")
    if not is_id(env.get("sid")) or not is_id(env.get("mid")):
        raise Malformed("reply ids are not well formed")
    if not isinstance(status, str) or status not in STATUSES:
        raise Malformed("reply status is not well formed")
    alg = env.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in ALGORITHMS):
        raise Malformed("unknown alg")
    base = {"v", "sid", "mid", "status"} | ({"alg"} if "alg" in env else set())
    if status == "rejected":
        if set(env) != base | {"code"} or not isinstance(env["code"], str):
            raise Malformed("a rejected notice has exactly a code")
        return Reply(
            field=field, sid=env["sid"], mid=env["mid"], status=status, alg=alg, code=env["code"]
        )
    if alg is None or set(env) != base | {"iv", "encryptedData", "authTag"}:
        raise Malformed("reply fields are not the protocol's")
    try:
        iv = binary(env["iv"], field)
        data = binary(env["encryptedData"], field)
        tag = binary(env["authTag"], field)
    except DecodeError as exc:
        raise Malformed(str(exc)) from None
    if len(iv) != IV_SIZE or len(tag) != TAG_SIZE:
        raise Malformed("iv must be 12 bytes and authTag 16 bytes")
    return Reply(
        field=field,
        sid=env["sid"],
        mid=env["mid"],
        status=status,
        alg=alg,
        iv=iv,
        encrypted_data=data,
        auth_tag=tag,
    )
