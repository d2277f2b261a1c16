"""The wire codec: round trips, strict decoding, refusals and the context they carry."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import struct
import tracemalloc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from worker import codec, wire
from worker.codec import Field
from worker.errors import Malformed, ProtocolError, Unsupported
from worker.protocol import ALG_RSA, ALG_SK, HANDSHAKE_TYPE
from worker.wire import Reply, Request

SID = "9f0c1e2d3c4b5a69788796a5b4c3d2e1"
MID = "5be1a2b3c4d5e6f708192a3b4c5d6e7f"
KID = "ab" * 32
TS = 1_700_000_000_123
FIELDS: tuple[Field, Field] = ("e", "j")

ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
kids = st.binary(min_size=32, max_size=32).map(bytes.hex)
types = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True).filter(
    lambda t: t != HANDSHAKE_TYPE
)


@dataclass(frozen=True)
class Verbatim:
    """Bytes written into a crafted encoding as they are (a raw token or a raw value)."""

    data: bytes


def pairs(alg: str = ALG_SK, *, handshake: bool = False) -> list[tuple[Any, Any]]:
    """The (key, value) pairs of a well-formed request envelope, binary as bytes."""
    out: list[tuple[Any, Any]] = [
        ("v", 1),
        ("alg", alg),
        ("sid", SID),
        ("mid", MID),
        ("ts", TS),
        ("type", HANDSHAKE_TYPE if handshake else "echo"),
        ("iv", bytes(range(12))),
        ("encryptedData", b"ciphertext"),
        ("authTag", bytes(range(16))),
    ]
    if alg == ALG_RSA:
        out.append(("encryptedAesKey", bytes(256)))
    if handshake:
        out.append(("kid", KID))
    return out


def _encode_one(value: Any, field: Field) -> bytes:
    if isinstance(value, Verbatim):
        return value.data
    if field == "e":
        data: bytes = msgpack.packb(value, use_bin_type=True)
        return data
    if isinstance(value, bytes):
        value = base64.b64encode(value).decode("ascii")
    return json.dumps(value).encode("utf-8")


def craft(items: Iterable[tuple[Any, Any]], field: Field) -> bytes:
    """A map encoded by hand from ``items`` in order, duplicates and all."""
    items = list(items)
    if field == "e":
        assert len(items) < 16
        body = b"".join(_encode_one(k, "e") + _encode_one(v, "e") for k, v in items)
        return bytes([0x80 | len(items)]) + body
    body = b",".join(_encode_one(k, "j") + b":" + _encode_one(v, "j") for k, v in items)
    return b"{" + body + b"}"


def entry(items: Iterable[tuple[Any, Any]], field: Field) -> dict[bytes, bytes]:
    """A one-field stream entry holding the crafted map."""
    return {field.encode(): craft(items, field)}


def replaced(items: list[tuple[Any, Any]], name: str, value: Any) -> list[tuple[Any, Any]]:
    """``items`` with the value of ``name`` replaced."""
    return [(k, value if k == name else v) for k, v in items]


def without(items: list[tuple[Any, Any]], name: str) -> list[tuple[Any, Any]]:
    """``items`` without ``name``."""
    return [(k, v) for k, v in items if k != name]


def as_read(fields: dict[str, bytes]) -> dict[bytes, bytes]:
    """An encoded entry as XREADGROUP hands it back: field names as bytes.

    encode_* return ``str`` field names (what XADD takes); decode_* take ``bytes``.
    """
    return {name.encode(): value for name, value in fields.items()}


def refused(
    fields: dict[bytes, bytes],
    kind: type[ProtocolError] = Malformed,
    *,
    decoded: bool = True,
    keep: bool = True,
) -> ProtocolError:
    """Assert decode_request refuses ``fields`` with exactly ``kind``; return the error.

    ``decoded`` says the envelope decoded to a map with the well-formed SID and MID,
    so the error must carry them; otherwise it must carry neither.
    """
    with pytest.raises(ProtocolError) as err:
        wire.decode_request(fields)
    assert kind is type(err.value)
    assert keep is err.value.keep_original
    expected_ids = (SID, MID) if decoded else (None, None)
    assert expected_ids == (err.value.session_id, err.value.message_id)
    return err.value


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """Any well-formed request envelope, in either encoding and algorithm."""
    alg = draw(st.sampled_from([ALG_RSA, ALG_SK]))
    handshake = alg == ALG_RSA and draw(st.booleans())
    return Request(
        field=draw(st.sampled_from(FIELDS)),
        alg=alg,
        sid=draw(ids),
        mid=draw(ids),
        ts=draw(st.integers(0, 2**53 - 1)),
        type=HANDSHAKE_TYPE if handshake else draw(types),
        iv=draw(st.binary(min_size=12, max_size=12)),
        encrypted_data=draw(st.binary(max_size=300)),
        auth_tag=draw(st.binary(min_size=16, max_size=16)),
        encrypted_aes_key=draw(st.binary(min_size=1, max_size=512)) if alg == ALG_RSA else None,
        kid=draw(kids) if handshake else None,
    )


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    """Any well-formed reply: ``ok``/``error`` with ciphertext, or a ``rejected`` notice."""
    status = draw(st.sampled_from(["ok", "error", "rejected"]))
    field = draw(st.sampled_from(FIELDS))
    if status == "rejected":
        return Reply(
            field=field,
            sid=draw(ids),
            mid=draw(ids),
            status=status,
            alg=draw(st.sampled_from([None, ALG_RSA, ALG_SK])),
            code=draw(st.text(max_size=40)),
        )
    return Reply(
        field=field,
        sid=draw(ids),
        mid=draw(ids),
        status=status,
        alg=draw(st.sampled_from([ALG_RSA, ALG_SK])),
        iv=draw(st.binary(min_size=12, max_size=12)),
        encrypted_data=draw(st.binary(max_size=300)),
        auth_tag=draw(st.binary(min_size=16, max_size=16)),
    )


# -- round trips -------------------------------------------------------------------


@settings(max_examples=200)
@given(request=requests())
def test_request_round_trips(request: Request) -> None:
    """decode_request(encode_request(r)) == r for both ``e`` and ``j``."""
    fields = wire.encode_request(request)
    assert [request.field] == list(fields)
    assert request == wire.decode_request(as_read(fields))


@settings(max_examples=200)
@given(reply=replies())
def test_reply_round_trips(reply: Reply) -> None:
    """decode_reply(encode_reply(r)) == r for both ``e`` and ``j``."""
    fields = wire.encode_reply(reply)
    assert [reply.field] == list(fields)
    assert reply == wire.decode_reply(as_read(fields))


@pytest.mark.parametrize("handshake", [False, True])
def test_encoded_request_has_the_spec_fields(handshake: bool) -> None:
    """An encoded request holds exactly the envelope's fields; binary raw or base64."""
    items = dict(pairs(ALG_RSA, handshake=handshake))
    request = wire.decode_request(entry(items.items(), "e"))
    as_msgpack = msgpack.unpackb(wire.encode_request(request)["e"], raw=False)
    assert items == as_msgpack
    as_json = json.loads(wire.encode_request(wire.decode_request(entry(items.items(), "j")))["j"])
    expected = {
        k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in items.items()
    }
    assert expected == as_json


def test_encoded_notice_omits_alg_and_ciphertext() -> None:
    """A ``rejected`` notice with no alg is ``{v, sid, mid, status, code}`` only."""
    notice = Reply(field="j", sid=SID, mid=MID, status="rejected", code="replay")
    expected = {"v": 1, "sid": SID, "mid": MID, "status": "rejected", "code": "replay"}
    assert expected == json.loads(wire.encode_reply(notice)["j"])


def test_json_is_written_as_json_stringify_does() -> None:
    """``j`` encoding is compact UTF-8 with non-ASCII characters as they are."""
    assert '{"text":"héllo","list":[1,2.5,null,true]}'.encode() == codec.dumps(
        {"text": "héllo", "list": [1, 2.5, None, True]}, "j"
    )


# -- strict decoding: refused before the envelope is looked at ---------------------


def strict_cases() -> list[Any]:
    """(field, raw entry bytes) that strict decoding must refuse."""
    good = pairs()
    mp, js = craft(good, "e"), craft(good, "j")
    extra = [*good, ("x", None)]

    def with_x(value: Any, field: Field) -> bytes:
        return craft(replaced(extra, "x", value), field)

    cases: dict[str, tuple[Field, bytes]] = {
        "e-trailing-nil": ("e", mp + b"\xc0"),
        "e-trailing-map": ("e", mp + mp),
        "e-truncated": ("e", mp[:-1]),
        "e-empty": ("e", b""),
        "j-trailing-object": ("j", js + b"{}"),
        "j-trailing-junk": ("j", js + b"x"),
        "j-two-values": ("j", js + b" " + js),
        "j-empty": ("j", b""),
        "e-duplicate-key-same-value": ("e", craft([*good, ("sid", SID)], "e")),
        "e-duplicate-key-other-value": ("e", craft([*good, ("ts", TS + 1)], "e")),
        "j-duplicate-key-same-value": ("j", craft([*good, ("sid", SID)], "j")),
        "j-duplicate-key-other-value": ("j", craft([*good, ("ts", TS + 1)], "j")),
        "j-nested-duplicate-key": ("j", with_x(Verbatim(b'{"a":1,"a":2}'), "j")),
        "e-nested-duplicate-key": ("e", with_x(Verbatim(craft([("a", 1), ("a", 2)], "e")), "e")),
        "e-int-key": ("e", craft([*good, (1, 2)], "e")),
        "e-binary-key": ("e", craft([*good, (b"x", 2)], "e")),
        "e-nil-key": ("e", craft([*good, (None, 2)], "e")),
        "e-nested-int-key": ("e", with_x({1: 2}, "e")),
        "j-nan": ("j", with_x(Verbatim(b"NaN"), "j")),
        "j-infinity": ("j", with_x(Verbatim(b"Infinity"), "j")),
        "j-minus-infinity": ("j", with_x(Verbatim(b"-Infinity"), "j")),
        "j-nested-nan": ("j", with_x(Verbatim(b"[1,NaN]"), "j")),
        "j-nan-in-ts": ("j", craft(replaced(good, "ts", Verbatim(b"NaN")), "j")),
        "e-float64-nan": ("e", with_x(Verbatim(b"\xcb" + struct.pack(">d", float("nan"))), "e")),
        "e-float32-nan": ("e", with_x(Verbatim(b"\xca" + struct.pack(">f", float("nan"))), "e")),
        "e-float64-inf": ("e", with_x(Verbatim(b"\xcb" + struct.pack(">d", float("inf"))), "e")),
        "e-float32-minus-inf": (
            "e",
            with_x(Verbatim(b"\xca" + struct.pack(">f", float("-inf"))), "e"),
        ),
        "e-nan-in-ts": ("e", craft(replaced(good, "ts", float("nan")), "e")),
        "e-ext-type": ("e", with_x(msgpack.ExtType(5, b"abc"), "e")),
        "e-timestamp": ("e", with_x(msgpack.Timestamp(0, 0), "e")),
        "e-timestamp-in-ts": ("e", craft(replaced(good, "ts", msgpack.Timestamp(1, 0)), "e")),
        "e-invalid-utf8-value": ("e", with_x(Verbatim(b"\xa2\xff\xfe"), "e")),
        "e-invalid-utf8-key": ("e", craft([*good, (Verbatim(b"\xa1\xff"), 1)], "e")),
        "e-surrogate-utf8": ("e", with_x(Verbatim(b"\xa3\xed\xa0\x80"), "e")),
        "j-invalid-utf8-value": ("j", with_x(Verbatim(b'"\xff"'), "j")),
        "j-overlong-utf8": ("j", with_x(Verbatim(b'"\xc0\xaf"'), "j")),
        "j-invalid-utf8-key": ("j", craft([*good, (Verbatim(b'"\xfe"'), 1)], "j")),
        "j-lone-high-surrogate": ("j", with_x(Verbatim(b'"\\ud800"'), "j")),
        "j-lone-low-surrogate": ("j", with_x(Verbatim(b'"a\\udc00b"'), "j")),
        "j-lone-surrogate-key": ("j", craft([*good, (Verbatim(b'"\\ud800"'), 1)], "j")),
        "j-deep-nesting": ("j", with_x(Verbatim(b"[" * 100_000 + b"]" * 100_000), "j")),
        "e-deep-nesting": ("e", with_x(Verbatim(b"\x91" * 100_000 + b"\xc0"), "e")),
        "j-not-json": ("j", b"{v:1}"),
        "e-reserved-byte": ("e", with_x(Verbatim(b"\xc1"), "e")),
    }
    return [pytest.param(field, raw, id=name) for name, (field, raw) in cases.items()]


@pytest.mark.parametrize(("field", "raw"), strict_cases())
def test_strict_decoding_refuses(field: Field, raw: bytes) -> None:
    """Trailing bytes, duplicate or non-string keys, NaN, ext types, bad UTF-8: Malformed.

    Refused before the envelope is read, so the error carries no ids.
    """
    refused({field.encode(): raw}, decoded=False)


@pytest.mark.parametrize(("field", "raw"), strict_cases())
def test_loads_refuses_what_strict_decoding_forbids(field: Field, raw: bytes) -> None:
    """codec.loads (also used for plaintexts) raises DecodeError for the same inputs."""
    with pytest.raises(codec.DecodeError):
        codec.loads(raw, field)


PAD = b" " * (2 * 1024)  # JSON whitespace that makes an entry large


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(case.values[1], id=case.id)
        for case in strict_cases()
        if case.values[0] == "j" and case.values[1][:1] == b"{"
    ],
)
def test_json_reader_refuses_the_same_past_a_bracket(raw: bytes) -> None:
    """The JSON cases above, led by a member holding "[", are refused alike, with no ids.

    Over 2 KiB (here by whitespace), a "[" in the bytes sends an entry past
    json.loads to the member-by-member reader.
    """
    refused({b"j": b'{"z":"[",' + PAD + raw[1:]}, decoded=False)


@pytest.mark.parametrize("field", FIELDS)
def test_control_extra_field_is_refused_after_decoding(field: Field) -> None:
    """The ``x`` field used above alone is refused later, with ids: the strict layer caught them."""
    refused(entry([*pairs(), ("x", None)], field))


@pytest.mark.parametrize(
    "raw", [msgpack.packb([1, 2]), msgpack.packb(1), msgpack.packb("map"), msgpack.packb(None)]
)
def test_msgpack_envelope_that_is_not_a_map_is_refused(raw: bytes) -> None:
    """An ``e`` envelope that is an array, integer, string or nil: Malformed, no ids."""
    refused({b"e": raw}, decoded=False)


@pytest.mark.parametrize("raw", [b"[1,2]", b"1", b'"map"', b"null", b"true"])
def test_json_envelope_that_is_not_an_object_is_refused(raw: bytes) -> None:
    """A ``j`` envelope that is an array, number, string or literal: Malformed, no ids."""
    refused({b"j": raw}, decoded=False)


# -- integers never as bool or float -----------------------------------------------


@pytest.mark.parametrize("value", [True, 1.0, "1", None], ids=repr)
@pytest.mark.parametrize("field", FIELDS)
def test_v_of_the_wrong_type_is_malformed(field: Field, value: Any) -> None:
    """``v`` given as bool, float, string, null or list is Malformed (not an integer)."""
    refused(entry(replaced(pairs(), "v", value), field))


@pytest.mark.parametrize("field", FIELDS)
def test_v_given_as_json_float_literal_is_malformed(field: Field) -> None:
    """``"v":1.0`` in JSON (and float64 1.0 in MessagePack) is Malformed."""
    raw = Verbatim(b"1.0") if field == "j" else Verbatim(b"\xcb" + struct.pack(">d", 1.0))
    refused(entry(replaced(pairs(), "v", raw), field))


@pytest.mark.parametrize("value", [0, 2, -1, 2**32])
@pytest.mark.parametrize("field", FIELDS)
def test_other_version_is_unsupported(field: Field, value: int) -> None:
    """An integer ``v`` other than 1 is Unsupported, with the ids for a notice."""
    refused(entry(replaced(pairs(), "v", value), field), Unsupported)


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        float(TS),
        Verbatim(b"1700000000123.0"),
        Verbatim(b"1.7e12"),
        str(TS),
        None,
    ],
    ids=repr,
)
@pytest.mark.parametrize("field", FIELDS)
def test_ts_of_the_wrong_type_is_malformed(field: Field, value: Any) -> None:
    """``ts`` given as bool, float, string or null is Malformed."""
    if isinstance(value, Verbatim) and field == "e":
        value = float(value.data.decode())
    refused(entry(replaced(pairs(), "ts", value), field))


@pytest.mark.parametrize("value", [0, -1, -(2**63), 2**53, 2**64 - 1], ids=repr)
@pytest.mark.parametrize("field", FIELDS)
def test_any_integer_ts_is_well_formed(field: Field, value: int) -> None:
    """Any integer ``ts`` decodes: whether it is fresh is the worker's check (``expired``)."""
    assert value == wire.decode_request(entry(replaced(pairs(), "ts", value), field)).ts


# -- binary values: raw bytes or canonical base64 ----------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("authTag", "AAECAwQFBgcICQoLDA0ODw"),  # missing padding
        ("authTag", "AAECAwQFBgcICQoLDA0ODw="),  # partial padding
        ("authTag", "AAECAwQFBgcICQoLDA0ODw==\n"),  # trailing newline
        ("authTag", "AAECAwQF BgcICQoLDA0ODw=="),  # inner space
        ("authTag", "AAECAwQF\nBgcICQoLDA0ODw=="),  # inner newline
        ("authTag", " AAECAwQFBgcICQoLDA0ODw=="),  # leading space
        ("authTag", "AAECAwQFBgcICQoLDA0ODx=="),  # stray bits
        ("encryptedData", "AB=="),  # stray bits ("AA==" is canonical)
        ("encryptedData", "AAF="),  # stray bits with padding
        ("encryptedData", "-_-_"),  # URL-safe alphabet
        ("encryptedData", "AA==AA=="),  # padding inside
        ("encryptedData", "A==="),  # impossible padding
        ("encryptedData", "=AAA"),  # leading padding
        ("iv", "AAECAwQFBgcICQoL\t"),  # tab
    ],
)
def test_non_canonical_base64_is_malformed(name: str, text: str) -> None:
    """JSON binary that is not canonical padded standard base64 is Malformed."""
    refused(entry(replaced(pairs(), name, Verbatim(json.dumps(text).encode())), "j"))


def test_canonical_base64_control_decodes() -> None:
    """The canonical forms of the values above decode."""
    items = replaced(pairs(), "encryptedData", Verbatim(b'"AA=="'))
    assert b"\x00" == wire.decode_request(entry(items, "j")).encrypted_data
    assert b"\x00" == codec.b64decode("AA==")
    assert bytes(range(16)) == codec.b64decode("AAECAwQFBgcICQoLDA0ODw==")


@pytest.mark.parametrize("text", ["AB==", "AA", "AA=", "AA==\n", " AA==", "A", "AA==AA==", "-_=="])
def test_b64decode_refuses_non_canonical_text(text: str) -> None:
    """codec.b64decode raises DecodeError for non-canonical base64."""
    with pytest.raises(codec.DecodeError):
        codec.b64decode(text)


@settings(max_examples=100)
@given(data=st.binary(max_size=64))
def test_b64_round_trips(data: bytes) -> None:
    """b64decode(b64encode(x)) == x."""
    assert data == codec.b64decode(codec.b64encode(data))


@pytest.mark.parametrize("name", ["iv", "encryptedData", "authTag", "encryptedAesKey"])
def test_msgpack_binary_given_as_string_is_malformed(name: str) -> None:
    """In ``e``, binary given as a str (or int) instead of bin is Malformed."""
    items = pairs(ALG_RSA)
    refused(entry(replaced(items, name, "A" * 16), "e"))
    refused(entry(replaced(items, name, 7), "e"))


@pytest.mark.parametrize("value", [[0] * 12, 12, None, True])
def test_json_binary_given_as_non_string_is_malformed(value: Any) -> None:
    """In ``j``, binary given as an array, number, null or bool is Malformed."""
    refused(entry(replaced(pairs(), "iv", value), "j"))


@pytest.mark.parametrize(
    ("name", "length"),
    [
        ("iv", 0),
        ("iv", 11),
        ("iv", 13),
        ("iv", 16),
        ("authTag", 0),
        ("authTag", 12),
        ("authTag", 17),
    ],
)
@pytest.mark.parametrize("field", FIELDS)
def test_wrong_iv_or_tag_length_is_malformed(field: Field, name: str, length: int) -> None:
    """An iv that is not 12 bytes or an authTag that is not 16 bytes is Malformed."""
    refused(entry(replaced(pairs(), name, bytes(length)), field))


# -- fields ------------------------------------------------------------------------


@pytest.mark.parametrize("field", FIELDS)
def test_unknown_field_is_malformed(field: Field) -> None:
    """An envelope with a field the protocol does not define is Malformed."""
    refused(entry([*pairs(), ("payload", "x")], field))


@pytest.mark.parametrize(
    "name",
    ["v", "alg", "sid", "mid", "ts", "type", "iv", "encryptedData", "authTag", "encryptedAesKey"],
)
@pytest.mark.parametrize("field", FIELDS)
def test_missing_field_is_malformed(field: Field, name: str) -> None:
    """An RSA envelope missing any one of its fields (``v`` and ``alg`` too) is Malformed."""
    with pytest.raises(ProtocolError) as err:
        wire.decode_request(entry(without(pairs(ALG_RSA), name), field))
    expected = (
        Malformed,
        True,
        None if name == "sid" else SID,
        None if name == "mid" else MID,
    )
    assert expected == (
        type(err.value),
        err.value.keep_original,
        err.value.session_id,
        err.value.message_id,
    )


@pytest.mark.parametrize("field", FIELDS)
def test_missing_kid_in_handshake_is_malformed(field: Field) -> None:
    """A handshake without ``kid`` is Malformed."""
    refused(entry(without(pairs(ALG_RSA, handshake=True), "kid"), field))


@pytest.mark.parametrize("field", FIELDS)
def test_encrypted_aes_key_in_sk_mode_is_malformed(field: Field) -> None:
    """An SK envelope carrying ``encryptedAesKey`` is Malformed."""
    refused(entry([*pairs(ALG_SK), ("encryptedAesKey", bytes(256))], field))


@pytest.mark.parametrize("alg", [ALG_RSA, ALG_SK])
@pytest.mark.parametrize("field", FIELDS)
def test_kid_outside_a_handshake_is_malformed(field: Field, alg: str) -> None:
    """A non-handshake request carrying ``kid`` is Malformed."""
    refused(entry([*pairs(alg), ("kid", KID)], field))


@pytest.mark.parametrize("with_wrapped_key", [False, True])
@pytest.mark.parametrize("field", FIELDS)
def test_handshake_with_sk_alg_is_malformed(field: Field, with_wrapped_key: bool) -> None:
    """A handshake in ``SK+A256GCM`` is Malformed, with or without encryptedAesKey."""
    items = replaced(pairs(ALG_RSA, handshake=True), "alg", ALG_SK)
    if not with_wrapped_key:
        items = without(items, "encryptedAesKey")
    refused(entry(items, field))


@pytest.mark.parametrize("kid", ["AB" * 32, "ab" * 31, "ab" * 33, "zz" * 32, 7, None])
@pytest.mark.parametrize("field", FIELDS)
def test_handshake_with_bad_kid_is_malformed(field: Field, kid: Any) -> None:
    """A handshake ``kid`` that is not 64 lowercase hex characters is Malformed."""
    refused(entry(replaced(pairs(ALG_RSA, handshake=True), "kid", kid), field))


def test_handshake_decodes_with_its_kid() -> None:
    """A well-formed handshake decodes with its kid and is_handshake set."""
    request = wire.decode_request(entry(pairs(ALG_RSA, handshake=True), "j"))
    assert (True, KID) == (request.is_handshake, request.kid)


@pytest.mark.parametrize("alg", ["A256GCM", "none", "", "rsa-oaep-256+a256gcm", "SK+A128GCM"])
@pytest.mark.parametrize("field", FIELDS)
def test_unknown_alg_is_unsupported(field: Field, alg: str) -> None:
    """A string ``alg`` that is not one of the two is Unsupported, with the ids for a notice."""
    refused(entry(replaced(pairs(), "alg", alg), field), Unsupported)


@pytest.mark.parametrize("alg", [1, True, None], ids=repr)
@pytest.mark.parametrize("field", FIELDS)
def test_alg_of_the_wrong_type_is_malformed(field: Field, alg: Any) -> None:
    """An ``alg`` that is not a string (number, bool, null) is Malformed."""
    refused(entry(replaced(pairs(), "alg", alg), field))


@pytest.mark.parametrize("alg", [[], [ALG_SK], {}, {"alg": ALG_SK}], ids=repr)
@pytest.mark.parametrize("field", FIELDS)
def test_alg_given_as_array_or_map_is_refused_not_raised(field: Field, alg: Any) -> None:
    """An ``alg`` given as an array or map is a ProtocolError, never another exception."""
    with pytest.raises(ProtocolError) as err:
        wire.decode_request(entry(replaced(pairs(), "alg", alg), field))
    assert (SID, MID) == (err.value.session_id, err.value.message_id)


BAD_IDS = [
    SID.upper(),
    SID[:-1],
    SID + "0",
    "g" + SID[1:],
    SID[:-1] + "\n",
    " " + SID[1:],
    "",
    7,
    None,
]


@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
@pytest.mark.parametrize("field", FIELDS)
def test_bad_sid_is_malformed_without_session_id(field: Field, value: Any) -> None:
    """A sid that is not 32 lowercase hex chars is Malformed; the error carries no sid."""
    with pytest.raises(Malformed) as err:
        wire.decode_request(entry(replaced(pairs(), "sid", value), field))
    assert (None, MID, True) == (
        err.value.session_id,
        err.value.message_id,
        err.value.keep_original,
    )


@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
@pytest.mark.parametrize("field", FIELDS)
def test_bad_mid_is_malformed_without_message_id(field: Field, value: Any) -> None:
    """A mid that is not 32 lowercase hex chars is Malformed; the error carries no mid."""
    with pytest.raises(Malformed) as err:
        wire.decode_request(entry(replaced(pairs(), "mid", value), field))
    assert (SID, None, True) == (
        err.value.session_id,
        err.value.message_id,
        err.value.keep_original,
    )


def test_binary_sid_in_msgpack_is_malformed() -> None:
    """A sid given as MessagePack bin (not str) is Malformed."""
    with pytest.raises(Malformed) as err:
        wire.decode_request(entry(replaced(pairs(), "sid", SID.encode()), "e"))
    assert err.value.session_id is None


@pytest.mark.parametrize(
    "value", ["", "a" * 65, "a b", "héllo", "a/b", "echo\n", "a|b", 7, None, ["echo"]], ids=repr
)
@pytest.mark.parametrize("field", FIELDS)
def test_bad_type_is_malformed(field: Field, value: Any) -> None:
    """A ``type`` not matching ``[A-Za-z0-9_.:-]{1,64}`` is Malformed."""
    refused(entry(replaced(pairs(), "type", value), field))


@pytest.mark.parametrize("value", ["a" * 64, "a", "Az09_.:-", "billing:charge.v2"])
def test_well_formed_types_decode(value: str) -> None:
    """Types at the edges of the pattern decode."""
    assert value == wire.decode_request(entry(replaced(pairs(), "type", value), "e")).type


# -- entry shape and size ----------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {b"e": msgpack.packb({}), b"j": b"{}"},
        {b"x": b"{}"},
        {b"E": b"{}"},
        {b"J": b"{}"},
        {b"e": b"{}", b"x": b""},
        {b"envelope": b"{}"},
        {b"": b"{}"},
    ],
    ids=["no-field", "e-and-j", "x", "E", "J", "e-and-x", "envelope", "empty-name"],
)
def test_entry_without_exactly_one_e_or_j_field_is_refused_without_original(
    fields: dict[bytes, bytes],
) -> None:
    """0 or 2 fields, or one not named e/j: Malformed, keep_original False, no ids."""
    refused(fields, decoded=False, keep=False)


@pytest.mark.parametrize("field", FIELDS)
def test_entry_at_the_size_limit_decodes_and_over_it_is_refused(field: Field) -> None:
    """max_size counts field name and value bytes; one byte over: Malformed, no original."""
    fields = entry(pairs(), field)
    size = len(field) + len(fields[field.encode()])
    assert size == wire.entry_size(fields)
    assert SID == wire.decode_request(fields, max_size=size).sid
    with pytest.raises(Malformed) as err:
        wire.decode_request(fields, max_size=size - 1)
    assert (False, None, None) == (
        err.value.keep_original,
        err.value.session_id,
        err.value.message_id,
    )


def test_default_size_limit_is_one_mebibyte() -> None:
    """An entry over 1 MiB is refused by default without its original, before decoding."""
    fields = {b"e": craft(replaced(pairs(), "encryptedData", bytes(1024 * 1024)), "e")}
    refused(fields, decoded=False, keep=False)


# -- context -----------------------------------------------------------------------


@pytest.mark.parametrize("field", FIELDS)
def test_refusal_after_decoding_carries_field_alg_and_type(field: Field) -> None:
    """An error for a decoded envelope carries its field, alg and type for the dead letter."""
    error = refused(entry([*pairs(ALG_RSA), ("extra", 1)], field))
    assert (field, ALG_RSA, "echo") == (error.field, error.alg, error.type)


def test_refusal_with_bad_type_and_alg_leaves_them_out() -> None:
    """A malformed type or unknown alg is not echoed into the error context."""
    items = replaced(replaced(pairs(), "type", "bad type"), "alg", "nope")
    error = refused(entry(items, "e"), Unsupported)
    assert (None, None) == (error.alg, error.type)


# -- no other exception, ever ------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
)
msgpack_values = st.recursive(
    scalars | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 9), inner, max_size=4)
    ),
    max_leaves=12,
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
names = st.sampled_from(
    [
        "v",
        "alg",
        "sid",
        "mid",
        "ts",
        "type",
        "iv",
        "encryptedData",
        "authTag",
        "encryptedAesKey",
        "kid",
    ]
)


def _assert_only_protocol_errors(fields: dict[bytes, bytes]) -> None:
    try:
        wire.decode_request(fields)
    except ProtocolError as error:
        assert type(error) in (Malformed, Unsupported)
        assert error.session_id is None or wire.is_id(error.session_id)
        assert error.message_id is None or wire.is_id(error.message_id)


@settings(max_examples=200)
@given(field=st.sampled_from(FIELDS), raw=st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_errors(field: Field, raw: bytes) -> None:
    """decode_request of arbitrary ``e``/``j`` bytes raises nothing but ProtocolError."""
    _assert_only_protocol_errors({field.encode(): raw})


@settings(max_examples=200)
@given(
    value=st.dictionaries(
        names | st.text(max_size=8) | st.integers(0, 9) | st.binary(max_size=4),
        msgpack_values,
        max_size=12,
    )
    | msgpack_values
)
def test_arbitrary_msgpack_maps_raise_only_protocol_errors(value: Any) -> None:
    """decode_request of any MessagePack map (or other value) raises nothing but ProtocolError."""
    _assert_only_protocol_errors({b"e": msgpack.packb(value, use_bin_type=True)})


@settings(max_examples=200)
@given(value=st.dictionaries(names | st.text(max_size=8), json_values, max_size=12) | json_values)
def test_arbitrary_json_objects_raise_only_protocol_errors(value: Any) -> None:
    """decode_request of any JSON object (NaN included) raises nothing but ProtocolError."""
    _assert_only_protocol_errors({b"j": json.dumps(value).encode("utf-8")})


@settings(max_examples=200)
@given(
    field=st.sampled_from(FIELDS),
    alg=st.sampled_from([ALG_RSA, ALG_SK]),
    handshake=st.booleans(),
    changes=st.dictionaries(names, msgpack_values, max_size=4),
    removed=st.sets(names, max_size=2),
)
def test_mutated_envelopes_raise_only_protocol_errors(
    field: Field, alg: str, handshake: bool, changes: dict[str, Any], removed: set[str]
) -> None:
    """An envelope with fields replaced or removed raises only ProtocolError, else round-trips."""
    env = dict(pairs(alg, handshake=handshake))
    env.update(changes)
    for name in removed:
        env.pop(name, None)
    if field == "j":
        env = {
            k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in env.items()
        }
        try:
            raw = json.dumps(env).encode("utf-8")
        except (TypeError, ValueError):
            return  # a nested bytes value has no JSON form
    else:
        raw = msgpack.packb(env, use_bin_type=True)
    try:
        request = wire.decode_request({field.encode(): raw})
    except ProtocolError as error:
        assert type(error) in (Malformed, Unsupported)
        return
    assert request == wire.decode_request(as_read(wire.encode_request(request)))


# -- bounded work: the envelope is a flat map ---------------------------------------

HEAD = pairs()[:4]  # v, alg, sid, mid: read before whatever follows
NEAR_MIB = 1024 * 1024 - 1024


def big_entry(field: Field, members: list[bytes]) -> dict[bytes, bytes]:
    """An entry of HEAD and then ``members``, each a raw encoded key and value."""
    head = [
        _encode_one(k, field) + (b"" if field == "e" else b":") + _encode_one(v, field)
        for k, v in HEAD
    ]
    if field == "e":
        count = struct.pack(">I", len(head) + len(members))
        return {b"e": b"\xdf" + count + b"".join(head + members)}
    return {b"j": b"{" + b",".join(head + members) + b"}"}


def mp_array(item: bytes, n: int) -> bytes:
    """A MessagePack array32 of ``n`` copies of the one-byte value ``item``."""
    return b"\xdd" + struct.pack(">I", n) + item * n


def hostile_cases() -> list[Any]:
    """(name, fields, whether the refusal carries the ids): the worst entries found."""
    n = NEAR_MIB
    many = 80_000
    cases: list[tuple[str, dict[bytes, bytes], bool]] = [
        ("e-array-of-empty-maps", big_entry("e", [b"\xa1x" + mp_array(b"\x80", n)]), True),
        ("e-array-of-empty-arrays", big_entry("e", [b"\xa1x" + mp_array(b"\x90", n)]), True),
        (
            "e-28-arrays-of-empty-maps",
            big_entry(
                "e", [msgpack.packb(f"x{i}") + mp_array(b"\x80", n // 30) for i in range(28)]
            ),
            True,
        ),
        ("e-deep-nesting", big_entry("e", [b"\xa1x" + b"\x91" * n + b"\xc0"]), False),
        (
            "e-map-of-many-members",
            big_entry("e", [msgpack.packb(f"k{i}") + b"\xc0" for i in range(many)]),
            False,
        ),
        ("j-array-of-empty-maps", big_entry("j", [b'"x":[' + b"{}," * (n // 3) + b"{}]"]), False),
        ("j-array-of-empty-arrays", big_entry("j", [b'"x":[' + b"[]," * (n // 3) + b"[]]"]), False),
        ("j-deep-nesting", big_entry("j", [b'"x":' + b"[" * (n // 2) + b"]" * (n // 2)]), False),
        (
            "j-nested-member-first",
            {b"j": b'{"x":[' + b"{}," * (n // 3) + b"{}]," + craft(pairs(), "j")[1:]},
            False,
        ),
        ("j-object-of-many-members", big_entry("j", [b'"k%d":0' % i for i in range(many)]), False),
        (
            "j-object-of-many-members-after-a-bracket",
            big_entry("j", [b'"a":"["', *(b'"k%d":0' % i for i in range(many))]),
            False,
        ),
    ]
    return [pytest.param(fields, ids, id=name) for name, fields, ids in cases]


HOSTILE = hostile_cases()


@pytest.mark.parametrize(("fields", "decoded"), HOSTILE)
def test_hostile_entries_are_malformed(fields: dict[bytes, bytes], decoded: bool) -> None:
    """A MiB of nested containers or of members is Malformed, under the size limit.

    MessagePack skips a nested value and reads on, so its ids are known; a JSON
    nested value cannot be skipped without parsing it, so a large one is refused
    where it starts, like undecodable bytes: no ids.
    """
    assert wire.entry_size(fields) <= wire.DEFAULT_MAX_SIZE
    refused(fields, decoded=decoded)


@pytest.mark.parametrize(("fields", "decoded"), HOSTILE)
def test_hostile_entries_are_refused_without_building_their_values(
    fields: dict[bytes, bytes], decoded: bool
) -> None:
    """Refusing a hostile entry allocates about its size, not a value per byte.

    (A million empty dicts take over 60 MB.)
    """
    tracemalloc.start()
    try:
        with pytest.raises(Malformed):
            wire.decode_request(fields)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * wire.DEFAULT_MAX_SIZE


@pytest.mark.parametrize("at", [0, 4, 9], ids=["first", "middle", "last"])
@pytest.mark.parametrize("value", [[], [1, [2]], {}, {"a": {"b": 1}}], ids=repr)
@pytest.mark.parametrize("field", FIELDS)
def test_nested_member_of_a_small_envelope_is_malformed_with_ids(
    field: Field, value: Any, at: int
) -> None:
    """A strictly valid nested member anywhere in a small envelope: Malformed, with ids."""
    items = pairs()
    items.insert(at, ("x", value))
    error = refused(entry(items, field))
    assert "the envelope must be a flat map" == error.detail


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested-first"])
@pytest.mark.parametrize("field", FIELDS)
def test_more_than_max_fields_is_malformed_without_ids(field: Field, nested: bool) -> None:
    """An envelope of MAX_FIELDS + 1 members is refused as not an envelope: no ids.

    Also when a nested member comes first and the small entry is parsed in full.
    """
    items: list[tuple[Any, Any]] = [("n", [1])] if nested else []
    items += pairs()
    extra = [(f"x{i}", i) for i in range(codec.MAX_FIELDS + 1 - len(items))]
    raw = msgpack.packb(dict(items + extra)) if field == "e" else craft(items + extra, "j")
    refused({field.encode(): raw}, decoded=False)


@pytest.mark.parametrize("field", FIELDS)
def test_max_fields_are_read_and_refused_as_unknown(field: Field) -> None:
    """An envelope of exactly MAX_FIELDS members is read: unknown fields, with ids."""
    items = pairs()
    extra = [(f"x{i}", i) for i in range(codec.MAX_FIELDS - len(items))]
    raw = msgpack.packb(dict(items + extra)) if field == "e" else craft(items + extra, "j")
    assert refused({field.encode(): raw}).detail.startswith("fields: missing [], unknown [")


# -- the log line of a refusal is bounded -------------------------------------------


@pytest.mark.parametrize("field", FIELDS)
def test_refusal_names_at_most_three_fields_each_cut(field: Field) -> None:
    """Five unknown 100,000-character names: three shown, cut to 32 characters, + 2 more."""
    names = [str(i) * 100_000 for i in range(5)]
    error = refused(entry([*pairs(), *((name, 1) for name in names)], field))
    shown = ", ".join(repr(name[:32] + "…") for name in names[:3])
    assert f"fields: missing [], unknown [{shown}] (+2 more)" == error.detail


def test_refusal_detail_escapes_field_names() -> None:
    """A field name with a newline cannot split the log line: names are written escaped."""
    error = refused(entry([*pairs(), ("a\nb", 1)], "j"))
    assert "fields: missing [], unknown ['a\\nb']" == error.detail


# -- plaintexts: containers and nesting are capped -------------------------------------


@pytest.mark.parametrize("kind", ["array", "map"])
@pytest.mark.parametrize("field", FIELDS)
def test_loads_refuses_a_container_over_the_length_cap(field: Field, kind: str) -> None:
    """An array or map of MAX_CONTAINER_LEN items decodes; one more is a DecodeError."""

    def value(n: int) -> Any:
        return [0] * n if kind == "array" else {str(i): 0 for i in range(n)}

    def raw(n: int) -> bytes:
        return msgpack.packb(value(n)) if field == "e" else json.dumps(value(n)).encode()

    assert codec.MAX_CONTAINER_LEN == len(codec.loads(raw(codec.MAX_CONTAINER_LEN), field))
    with pytest.raises(codec.DecodeError):
        codec.loads(raw(codec.MAX_CONTAINER_LEN + 1), field)


@pytest.mark.parametrize("field", FIELDS)
def test_loads_nests_at_most_max_depth(field: Field) -> None:
    """A value MAX_DEPTH levels below the top decodes; one level deeper is a DecodeError."""

    def raw(levels: int) -> bytes:
        value: Any = []
        for _ in range(levels):
            value = [value]
        return msgpack.packb(value) if field == "e" else json.dumps(value).encode()

    codec.loads(raw(codec.MAX_DEPTH), field)
    with pytest.raises(codec.DecodeError):
        codec.loads(raw(codec.MAX_DEPTH + 1), field)


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("e", b"\x91" * NEAR_MIB + b"\xc0"),
        ("j", b"[" * NEAR_MIB),
        ("j", b'{"a":' * (NEAR_MIB // 5)),
    ],
    ids=["e-arrays", "j-arrays", "j-objects"],
)
def test_loads_refuses_a_mebibyte_of_nesting_at_the_parsers_limit(field: Field, raw: bytes) -> None:
    """A MiB of nesting is refused where the parser's stack ends, not after building it."""
    tracemalloc.start()
    try:
        with pytest.raises(codec.DecodeError):
            codec.loads(raw, field)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(raw)


def test_is_large_is_over_64_kib() -> None:
    """is_large: up to 64 KiB decodes on the event loop, more goes to a thread."""
    assert (False, True) == (codec.is_large(bytes(64 * 1024)), codec.is_large(bytes(64 * 1024 + 1)))


# -- the shallow reader against a full strict parse ---------------------------------


def reference_request(field: Field, raw: bytes) -> Request | None:
    """The spec applied to a full strict parse (``codec.loads``) of ``raw``; None if refused."""
    try:
        env = codec.loads(raw, field)
    except codec.DecodeError:
        return None
    if not isinstance(env, dict):
        return None
    alg, type_ = env.get("alg"), env.get("type")
    handshake = type_ == HANDSHAKE_TYPE
    binaries = ["iv", "encryptedData", "authTag", *(["encryptedAesKey"] if alg == ALG_RSA else [])]
    names = {"v", "alg", "sid", "mid", "ts", "type", *binaries, *(["kid"] if handshake else [])}
    if set(env) != names or alg not in (ALG_RSA, ALG_SK) or (handshake and alg != ALG_RSA):
        return None
    if type(env["v"]) is not int or env["v"] != 1 or type(env["ts"]) is not int:
        return None
    if not (wire.is_id(env["sid"]) and wire.is_id(env["mid"]) and wire.is_type(type_)):
        return None
    kid = env.get("kid")
    if handshake and not (isinstance(kid, str) and re.fullmatch("[0-9a-f]{64}", kid)):
        return None
    try:
        data = {name: codec.binary(env[name], field) for name in binaries}
    except codec.DecodeError:
        return None
    if len(data["iv"]) != 12 or len(data["authTag"]) != 16:
        return None
    return Request(
        field=field,
        alg=alg,
        sid=env["sid"],
        mid=env["mid"],
        ts=env["ts"],
        type=env["type"],
        iv=data["iv"],
        encrypted_data=data["encryptedData"],
        auth_tag=data["authTag"],
        encrypted_aes_key=data.get("encryptedAesKey"),
        kid=kid,
    )


def reference_ids(field: Field, raw: bytes, *, flat: bool = False) -> tuple[str | None, str | None]:
    """The ids a refusal carries: those of a strict map of <= MAX_FIELDS (``flat``: scalars)."""
    try:
        env = codec.loads(raw, field)
    except codec.DecodeError:
        return None, None
    if not isinstance(env, dict) or len(env) > codec.MAX_FIELDS:
        return None, None
    if flat and any(isinstance(value, dict | list) for value in env.values()):
        return None, None
    sid, mid = env.get("sid"), env.get("mid")
    return (sid if wire.is_id(sid) else None, mid if wire.is_id(mid) else None)


@st.composite
def spelled_requests(draw: st.DrawFn, field: Field | None = None) -> tuple[Request, bytes]:
    """A valid request, its members in any order, JSON with any whitespace between tokens."""
    request = draw(requests())
    if field is not None:
        request = dataclasses.replace(request, field=field)
    field = request.field
    env = codec.loads(wire.encode_request(request)[field], field)
    items = draw(st.permutations(list(env.items())))
    if field == "e":
        return request, craft(items, "e")
    space = st.text(alphabet=" \t\n\r", max_size=3)
    parts = [draw(space) + "{"]
    for i, (key, value) in enumerate(items):
        parts += [","] if i else []
        parts += [draw(space), json.dumps(key), draw(space), ":", draw(space), json.dumps(value)]
        parts += [draw(space)]
    parts += ["}", draw(space)]
    return request, "".join(parts).encode()


@settings(max_examples=300)
@given(spelled=spelled_requests(), large=st.booleans())
def test_shallow_reader_agrees_with_the_full_parser_on_valid_envelopes(
    spelled: tuple[Request, bytes], large: bool
) -> None:
    """Every valid envelope, in either encoding, decodes to what a full strict parse reads.

    ``large`` pads JSON with whitespace over 2 KiB (its bytes are then scanned first).
    """
    request, raw = spelled
    if large and request.field == "j":
        raw = PAD + raw
    assert request == reference_request(request.field, raw)
    assert request == wire.decode_request({request.field.encode(): raw})


VALUES: dict[str, list[bytes]] = {
    "e": [
        b"\x90",
        b"\x80",
        b"\x91\x80",
        b"\x81\xa1a\x90",
        b"\x81\x01\x02",
        b"\x82\xa1a\x01\xa1a\x02",
        b"\x91\xc1",
        b"\xdc\x00\x01\xc0",
        b"\xde\x00\x00",
        b"\xd4\x05\x00",
        b"\xd6\xff\x00\x00\x00\x00",
        b"\xcb" + struct.pack(">d", float("nan")),
        b"\xa2\xff\xfe",
        b"\xc4\x00",
        b"\xc0",
        b"\xc1",
        b"\x91" * 70 + b"\xc0",
    ],
    "j": [
        b"[]",
        b"{}",
        b"[{}]",
        b'{"a":[1]}',
        b'{"a":1,"a":2}',
        b"[NaN]",
        b"NaN",
        b"-Infinity",
        b"1e999",
        b"1.0",
        b"-0",
        b'"["',
        b'"{"',
        b'"\\ud800"',
        b'"\\u005b"',
        b"true",
        b"null",
        b"[" * 70 + b"]" * 70,
        b"01",
        b'"a\x01"',
    ],
}


ODD_KEYS: dict[str, list[Any]] = {
    "e": [Verbatim(b"\xa1\xff"), Verbatim(b"\x90"), 1, b"k", None, "sid"],
    "j": [Verbatim(b'"\\ud800"'), Verbatim(b'"\\u005b"'), Verbatim(b"1"), "sid", "a\nb"],
}


@st.composite
def hostile_entries(draw: st.DrawFn, field: Field | None = None) -> tuple[Field, bytes]:
    """A valid envelope spliced with nested or non-strict values, or with its bytes mutated."""
    request, raw = draw(spelled_requests(field))
    field = request.field
    if draw(st.booleans()):
        items: list[tuple[Any, Any]] = list(codec.loads(raw, field).items())
        for _ in range(draw(st.integers(1, 2))):
            value = Verbatim(draw(st.sampled_from(VALUES[field])))
            at = draw(st.integers(0, len(items) - 1))
            if draw(st.booleans()):
                items[at] = (items[at][0], value)
            else:
                key = draw(names | st.text(max_size=4) | st.sampled_from(ODD_KEYS[field]))
                items.insert(at, (key, value))
        if field == "e" and len(items) >= 16:
            items = items[:15]
        raw = craft(items, field)
    else:
        tokens = st.sampled_from([*VALUES[field], b"[", b"]", b"{", b"}", b",", b":", b'"', b"\\"])
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(raw)))
            chunk = draw(tokens | st.binary(min_size=1, max_size=3))
            cut = draw(st.sampled_from([0, 1, len(chunk), 4]))
            raw = raw[:at] + chunk + raw[at + cut :]
    return field, raw


@settings(max_examples=500)
@given(entry_=hostile_entries() | st.tuples(st.sampled_from(FIELDS), st.binary(max_size=200)))
def test_shallow_reader_is_the_full_parser_or_a_refusal(entry_: tuple[Field, bytes]) -> None:
    """For any small entry: the Request a full strict parse gives, or a refusal, ids as it reads.

    (Up to 2 KiB an entry with a nested value is also parsed in full, so even the
    ids of a refusal are the full parser's.)
    """
    field, raw = entry_
    assume(len(raw) <= 2 * 1024)
    expected = reference_request(field, raw)
    try:
        request = wire.decode_request({field.encode(): raw})
    except ProtocolError as error:
        assert (None, reference_ids(field, raw)) == (
            expected,
            (error.session_id, error.message_id),
        )
        return
    assert expected == request


@settings(max_examples=500)
@given(entry_=hostile_entries("j") | st.tuples(st.just("j"), st.binary(max_size=200)))
def test_json_reader_of_large_entries_is_the_full_parser_or_a_refusal(
    entry_: tuple[Field, bytes],
) -> None:
    """Over 2 KiB, a JSON entry is a full strict parse's Request or a refusal.

    A refusal carries the ids only when that parse reads a flat map: the reader
    stops at a nested value, not knowing what follows.
    """
    _, raw = entry_
    raw = PAD + raw
    expected = reference_request("j", raw)
    try:
        request = wire.decode_request({b"j": raw})
    except ProtocolError as error:
        assert (None, reference_ids("j", raw, flat=True)) == (
            expected,
            (error.session_id, error.message_id),
        )
        return
    assert expected == request


def test_large_msgpack_nested_value_is_skipped_unread() -> None:
    """Over 2 KiB, a MessagePack nested value is skipped, not read: Malformed with ids.

    Even when a full parse would refuse what is inside it (here a duplicate key):
    the entry is refused either way, only the notice differs.
    """
    nested = Verbatim(craft([("a", 1), ("a", 2)], "e"))
    items = [*replaced(pairs(), "encryptedData", bytes(4096)), ("x", nested)]
    error = refused(entry(items, "e"))
    assert "the envelope must be a flat map" == error.detail


# -- replies (client side) ---------------------------------------------------------


def reply_items(status: str = "ok") -> list[tuple[Any, Any]]:
    """The pairs of a well-formed reply envelope."""
    items: list[tuple[Any, Any]] = [
        ("v", 1),
        ("alg", ALG_SK),
        ("sid", SID),
        ("mid", MID),
        ("status", status),
    ]
    if status == "rejected":
        return [*items, ("code", "rejected")]
    return [*items, ("iv", bytes(12)), ("encryptedData", b"x"), ("authTag", bytes(16))]


@pytest.mark.parametrize(
    "items",
    [
        [*reply_items("rejected"), ("iv", bytes(12))],
        without(reply_items("ok"), "alg"),
        without(reply_items("ok"), "authTag"),
        replaced(reply_items("ok"), "status", "done"),
        replaced(reply_items("ok"), "v", 2),
        replaced(reply_items("ok"), "v", True),
        replaced(reply_items("ok"), "alg", "none"),
        replaced(reply_items("ok"), "iv", bytes(11)),
        replaced(reply_items("ok"), "sid", SID.upper()),
        [*reply_items("ok"), ("extra", 1)],
        [*reply_items("ok"), ("sid", SID)],
        replaced(reply_items("rejected"), "code", 7),
        replaced(reply_items("ok"), "status", []),
        replaced(reply_items("ok"), "status", {"ok": 1}),
        replaced(reply_items("ok"), "alg", [ALG_SK]),
        replaced(reply_items("rejected"), "alg", {}),
    ],
    ids=[
        "notice-with-iv",
        "ok-without-alg",
        "ok-without-tag",
        "unknown-status",
        "v2",
        "v-bool",
        "unknown-alg",
        "short-iv",
        "upper-sid",
        "extra-field",
        "duplicate-key",
        "code-not-string",
        "status-array",
        "status-map",
        "alg-array",
        "notice-alg-map",
    ],
)
@pytest.mark.parametrize("field", FIELDS)
def test_decode_reply_refuses_malformed_replies(field: Field, items: list[tuple[Any, Any]]) -> None:
    """decode_reply refuses replies that are not the protocol's with Malformed."""
    with pytest.raises(Malformed):
        wire.decode_reply(entry(items, field))


@settings(max_examples=200)
@given(field=st.sampled_from(FIELDS), raw=st.binary(max_size=200))
def test_decode_reply_of_arbitrary_bytes_raises_only_malformed(field: Field, raw: bytes) -> None:
    """decode_reply of arbitrary bytes raises nothing but Malformed."""
    try:
        wire.decode_reply({field.encode(): raw})
    except Malformed:
        pass


@settings(max_examples=200)
@given(
    field=st.sampled_from(FIELDS),
    status=st.sampled_from(["ok", "error", "rejected"]),
    changes=st.dictionaries(
        st.sampled_from(["v", "alg", "sid", "mid", "status", "code", "iv", "authTag"]),
        msgpack_values,
        max_size=3,
    ),
)
def test_decode_reply_of_mutated_replies_raises_only_malformed(
    field: Field, status: str, changes: dict[str, Any]
) -> None:
    """A reply with fields replaced by arbitrary values raises nothing but Malformed."""
    env = dict(reply_items(status))
    env.update(changes)
    if field == "j":
        env = {
            k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in env.items()
        }
        try:
            raw = json.dumps(env).encode("utf-8")
        except (TypeError, ValueError):
            return  # a nested bytes value has no JSON form
    else:
        raw = msgpack.packb(env, use_bin_type=True)
    try:
        wire.decode_reply({field.encode(): raw})
    except Malformed:
        pass


# -- writing: what strict decoding accepts, JSON as JSON.stringify --------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1"),
        (-0.0, "0"),
        (0.1, "0.1"),
        (-2.5, "-2.5"),
        (1e16, "10000000000000000"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.5e300, "1.5e+300"),
        (1e-6, "0.000001"),
        (1.2345e-6, "0.0000012345"),
        (1e-7, "1e-7"),
        (-2.5e-10, "-2.5e-10"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (123456789012345680000.0, "123456789012345680000"),
    ],
    ids=repr,
)
def test_floats_are_written_as_javascript_writes_them(value: float, text: str) -> None:
    """A float in JSON is laid out as JavaScript's Number#toString does."""
    assert text == codec.js_number(value)
    assert text.encode() == codec.dumps(value, "j")


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_written_floats_read_back_exactly(value: float) -> None:
    """Every finite float written as JSON reads back as the same double.

    An integral float is written without a fraction (as JavaScript does), so a
    reader sees an integer literal; as a double it is the same number.
    """
    assert value == float(codec.loads(codec.dumps([value], "j"), "j")[0])


def test_json_is_compact_utf8_with_stringify_escapes() -> None:
    """Keys in order, no spaces, non-ASCII as is, control characters escaped."""
    value = {"b": [1, True, None, 'é\n\x01"\\'], "a": {"x": -3}}
    assert '{"b":[1,true,null,"é\\n\\u0001\\"\\\\"],"a":{"x":-3}}'.encode() == codec.dumps(
        value, "j"
    )


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(
    "value",
    [{1: "a"}, {"ok": {b"k": 1}}, [{None: 1}], {"x": float("nan")}, {"s": "\ud800"}],
    ids=["int key", "bytes key", "null key", "NaN", "lone surrogate"],
)
def test_writing_refuses_what_strict_decoding_refuses(field: Field, value: Any) -> None:
    """A value a strict reader would refuse is not written, in either encoding."""
    with pytest.raises(ValueError):
        codec.dumps(value, field)


@pytest.mark.parametrize("field", FIELDS)
def test_tuples_are_written_as_arrays(field: Field) -> None:
    """A tuple goes out as an array and reads back as a list."""
    assert {"pair": [1, "b"]} == codec.loads(codec.dumps({"pair": (1, "b")}, field), field)


def test_bytes_cannot_be_written_as_json() -> None:
    """JSON has no binary type: bytes are a TypeError, not silently base64."""
    with pytest.raises(TypeError):
        codec.dumps({"blob": b"\x00"}, "j")


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.sampled_from([ALG_SK, ALG_RSA, HANDSHAKE_TYPE, SID, "echo", bytes(12), bytes(16)]),
)


#: nested values (the fast path of a large entry stops at them without building them)
_NESTED_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["v", "iv", "sid", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def near_requests(draw: st.DrawFn) -> dict[bytes, bytes]:
    """MessagePack entries close to a valid request: a member's value replaced (by a
    scalar or a nested value), a member dropped, duplicated or added, or the members
    reordered; small entries, and large ones (a long ciphertext) that the fast path
    parses in bounded work."""
    items = pairs(draw(st.sampled_from([ALG_SK, ALG_RSA])), handshake=draw(st.booleans()))
    if draw(st.booleans()):
        size = draw(st.integers(min_value=codec.SMALL - 300, max_value=3 * codec.SMALL))
        items = replaced(items, "encryptedData", bytes(size))
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        i = draw(st.integers(min_value=0, max_value=len(items) - 1))
        change = draw(st.sampled_from(["value", "drop", "duplicate", "add"]))
        if change == "value":
            items[i] = (items[i][0], draw(_SCALARS | _NESTED_VALUES))
        elif change == "drop":
            del items[i]
        elif change == "duplicate":
            items.append((items[i][0], draw(_SCALARS)))
        else:
            name = draw(
                st.sampled_from(["encryptedAesKey", "kid", "alg", "v"])
                | st.text(max_size=8)
                | st.binary(max_size=8)
            )
            items.append((name, draw(_SCALARS)))
    return entry(draw(st.permutations(items)), "e")


@settings(max_examples=2000)
@given(fields=near_requests())
def test_fast_path_decodes_exactly_what_the_full_path_does(fields: dict[bytes, bytes]) -> None:
    """The fast path of the common request either declines (None) or returns the
    very request the full decoder returns; it never accepts what the full one refuses."""
    fast = wire._fast_request(fields, wire.DEFAULT_MAX_SIZE)
    try:
        full: Request | None = wire._decode_request(fields, wire.DEFAULT_MAX_SIZE)
    except ProtocolError:
        full = None
    if fast is not None:
        assert fast == full


@pytest.mark.parametrize("size", [10, 4096, 65536])
def test_fast_path_takes_the_plain_requests(size: int) -> None:
    """The common SK and RSA requests, small or large, take the fast path (the
    property above would pass with a fast path that always declines)."""
    for alg in (ALG_SK, ALG_RSA):
        fields = entry(replaced(pairs(alg), "encryptedData", bytes(size)), "e")
        fast = wire._fast_request(fields, wire.DEFAULT_MAX_SIZE)
        assert fast is not None
        assert fast == wire._decode_request(fields, wire.DEFAULT_MAX_SIZE)
    assert wire._fast_request(entry(pairs(ALG_RSA, handshake=True), "e"), 1 << 20) is None


@pytest.mark.parametrize("value", [None, "", 0, bytes(256)])
def test_an_sk_request_with_an_encrypted_aes_key_member_is_malformed(value: Any) -> None:
    """An SK request carrying ``encryptedAesKey`` (even nil) has an unknown member:
    malformed on the fast path as on the full one."""
    fields = entry([*pairs(ALG_SK), ("encryptedAesKey", value)], "e")
    assert wire._fast_request(fields, wire.DEFAULT_MAX_SIZE) is None
    refused(fields, Malformed)


def test_fast_path_respects_the_size_limit() -> None:
    """An entry over the configured limit is refused, fast path or not."""
    fields = entry(pairs(), "e")
    size = wire.entry_size(fields)
    assert wire._fast_request(fields, size) is not None
    assert wire._fast_request(fields, size - 1) is None
    with pytest.raises(Malformed, match="over the size limit"):
        wire.decode_request(fields, max_size=size - 1)


_SK_MEMBERS = [name for name, _ in pairs(ALG_SK)]
#: a nested map with exactly the envelope's members (all empty arrays)
_ENVELOPE_LIKE = b"\x89" + b"".join(msgpack.packb(k) + b"\x90" for k in _SK_MEMBERS)


def _wide(n: int, value: bytes) -> bytes:
    """A map of ``n`` members ``"00000"``... each holding ``value`` (raw MessagePack)."""
    return b"\xdf" + n.to_bytes(4, "big") + b"".join(b"\xa5%05d" % i + value for i in range(n))


@pytest.mark.parametrize(
    "nested",
    [
        _wide(65536, b"\x80"),
        b"\x81\xa1a" * 50_000 + b"\x80",
        b"\xdd\x00\x01\x00\x00" + b"\x00" * 65536,
        _wide(99_999, b"\x90"),
        _wide(15_000, _ENVELOPE_LIKE),
        b"\x89" + b"".join(msgpack.packb(k) + _ENVELOPE_LIKE * 0 + b"\x90" for k in _SK_MEMBERS),
    ],
    ids=[
        "65536 empty maps",
        "50000 maps deep",
        "an array of 65536",
        "one map of 99999 members",
        "15000 envelope-like maps",
        "an envelope-like map",
    ],
)
def test_the_fast_path_declines_a_large_hostile_entry_without_building_it(nested: bytes) -> None:
    """A large entry shaped like a request whose first member holds a mass of nested
    values is declined having built almost nothing (a whole parse would build a dict
    or an int per byte), and the full path refuses it."""
    raw = b"\x89" + msgpack.packb("iv") + nested
    fields = {b"e": raw}
    tracemalloc.start()
    try:
        assert wire._fast_request(fields, wire.DEFAULT_MAX_SIZE) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    with pytest.raises(ProtocolError):
        wire.decode_request(fields)
