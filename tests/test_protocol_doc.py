"""``docs/protocol.md`` kept in step with the code.

The worked examples in the document are fenced blocks marked with an HTML comment
``<!-- example: <name> -->``; these tests recompute each one with the project's own
functions (AAD strings, HKDF keys, X25519, AES-GCM, key names, entry encodings) and
check that every dead-letter reason, notice code and error code the code names is
described. They check only what revision 2 of protocol version 1 did not change.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import inspect
import re
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker import codec, errors, wire
from worker.crypto import (
    Sealed,
    handshake_session_key,
    open_sealed,
    reply_aad,
    request_aad,
    seal,
    sk_reply_key,
    sk_request_key,
    x25519_shared,
)
from worker.keys import MasterKey, MasterKeys
from worker.keyspace import Names
from worker.protocol import ALG_RSA, ALG_SK, HANDSHAKE_TYPE
from worker.sessions import new_session, open_record, seal_record

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
_BLOCK = re.compile(r"<!-- example: ([a-z0-9-]+) -->\n```text\n(.*?)\n```", re.DOTALL)

#: Every example block and the test that checks it (a new block needs a check here).
CHECKED = {
    "inputs": "test_inputs_are_well_formed",
    "names": "test_key_names_match_names",
    "handshake-plaintext": "test_handshake_plaintext",
    "handshake-request-aad": "test_handshake_aads",
    "handshake-reply-aad": "test_handshake_aads",
    "handshake-ec": "test_handshake_session_key",
    "handshake-ew": "test_handshake_session_key",
    "handshake-z": "test_handshake_session_key",
    "handshake-info": "test_handshake_session_key",
    "handshake-info-hex": "test_handshake_session_key",
    "handshake-ks": "test_handshake_session_key",
    "sk-request-info": "test_sk_keys",
    "sk-request-info-hex": "test_sk_keys",
    "sk-request-key": "test_sk_keys",
    "sk-reply-info": "test_sk_keys",
    "sk-reply-key": "test_sk_keys",
    "request-aad-sk": "test_request_aads",
    "request-aad-sk-hex": "test_request_aads",
    "request-aad-rsa": "test_request_aads",
    "request-ciphertext": "test_request_seal",
    "request-tag": "test_request_seal",
    "request-entry-j": "test_request_entries",
    "request-entry-e-hex": "test_request_entries",
    "reply-aad-ok": "test_reply_aads",
    "reply-aad-ok-hex": "test_reply_aads",
    "reply-aad-error": "test_reply_aads",
    "reply-entry-j": "test_reply_entry",
    "notice-entry-j": "test_notice_entry",
    "kek-id": "test_session_record_aad",
    "session-record-aad": "test_session_record_aad",
}


@functools.cache
def text() -> str:
    """The document's text."""
    return DOC.read_text("utf-8")


@functools.cache
def blocks() -> dict[str, str]:
    """The marked example blocks by name (a name used twice fails)."""
    found: dict[str, str] = {}
    for name, body in _BLOCK.findall(text()):
        assert name not in found, f"example {name!r} appears twice"
        found[name] = body
    return found


def block(name: str) -> str:
    """One example block's text, exactly."""
    return blocks()[name]


def hex_block(name: str) -> bytes:
    """A hex example block (wrapped over lines) as bytes."""
    return bytes.fromhex("".join(block(name).split()))


def table(name: str) -> dict[str, str]:
    """A ``label  value`` example block as a dict."""
    rows = [line.split(None, 1) for line in block(name).splitlines()]
    return {label: value for label, value in rows}


def inputs() -> dict[str, str]:
    """The worked example's inputs."""
    return table("inputs")


def section(title: str) -> str:
    """The text under the ``## title`` heading, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text(), re.M | re.S)
    assert match is not None, f"no section {title!r} in {DOC.name}"
    return match.group(1)


def x25519_public(private_hex: str) -> tuple[x25519.X25519PrivateKey, bytes]:
    """An X25519 private key from hex and its raw public value."""
    private = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex))
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, public


def session_key() -> bytes:
    """Ks of the worked example, derived as the handshake does."""
    i = inputs()
    ec_private, ec = x25519_public(i["ec_private"])
    _, ew = x25519_public(i["ew_private"])
    return handshake_session_key(
        kb=bytes.fromhex(i["Kb"]),
        shared=x25519_shared(ec_private, ew),
        sid=i["sid"],
        client_ephemeral=ec,
        worker_ephemeral=ew,
    )


def sealed_request() -> Sealed:
    """The worked example's SK request, sealed with the documented iv."""
    i = inputs()
    return seal(
        sk_request_key(session_key(), i["mid"]),
        i["request_plaintext"].encode("utf-8"),
        request_aad(ALG_SK, i["sid"], i["mid"], int(i["ts"]), i["type"]),
        iv=bytes.fromhex(i["request_iv"]),
    )


def example_request(field: wire.Field) -> wire.Request:
    """The worked example's SK request envelope in the given field."""
    i, box = inputs(), sealed_request()
    return wire.Request(
        field=field,
        alg=ALG_SK,
        sid=i["sid"],
        mid=i["mid"],
        ts=int(i["ts"]),
        type=i["type"],
        iv=box.iv,
        encrypted_data=box.ciphertext,
        auth_tag=box.tag,
    )


def codes(base: type[errors.SealstreamError], attribute: str) -> set[str]:
    """Every value of ``attribute`` on ``base`` and its subclasses in worker.errors."""
    return {
        getattr(cls, attribute)
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, base) and isinstance(getattr(cls, attribute, None), str)
    }


# -- the document's shape ------------------------------------------------------------


def test_every_example_is_checked() -> None:
    """The marked example blocks are exactly those these tests check."""
    assert sorted(CHECKED) == sorted(blocks())


def test_checks_named_for_examples_exist() -> None:
    """Each example's named check is a test in this module."""
    missing = {name for name in CHECKED.values() if name not in globals()}
    assert set() == missing


def test_document_stands_alone() -> None:
    """The document points to nothing outside the repository (no ``../shared``)."""
    assert "../shared" not in text()
    assert "PROTOCOL.md" not in text()


def test_document_states_its_revision() -> None:
    """The document says which version and revision it describes."""
    assert "**Protocol version 1, revision 2.**" in text()


def test_inputs_are_well_formed() -> None:
    """The inputs are what the protocol allows: ids, type, key and iv lengths."""
    i = inputs()
    assert wire.is_id(i["sid"]) and wire.is_id(i["mid"]) and wire.is_id(i["handshake_mid"])
    assert wire.is_type(i["type"])
    assert [32, 32, 32, 32] == [
        len(bytes.fromhex(i[k])) for k in ("Kb", "ec_private", "ew_private", "kek")
    ]
    assert [12, 12] == [len(bytes.fromhex(i[k])) for k in ("request_iv", "reply_iv")]
    for name in ("request_plaintext", "reply_plaintext"):
        value = codec.loads(i[name].encode("utf-8"), "j")
        assert i[name].encode("utf-8") == codec.dumps(value, "j")


# -- names ---------------------------------------------------------------------------


def test_key_names_match_names() -> None:
    """The key-name examples are what worker.keyspace.Names gives for the inputs."""
    i = inputs()
    names, shown = Names(i["prefix"]), table("names")
    assert {
        "config": names.config,
        "request_stream_0": names.request_stream(0),
        "request_stream_3": names.request_stream(3),
        "session": names.session(i["sid"]),
        "reply_stream": names.reply_stream(i["sid"]),
        "seen": names.seen(i["sid"], i["mid"]),
        "dlq": names.dlq,
        "default_shard": str(names.default_shard(i["mid"], int(i["shards"]))),
    } == shown


def test_key_table_examples_match_names() -> None:
    """Every example in the Redis keys table is a name Names gives."""
    i = inputs()
    names = Names(i["prefix"])
    expected = {
        names.config,
        names.request_stream(0),
        names.session(i["sid"]),
        names.reply_stream(i["sid"]),
        names.seen(i["sid"], i["mid"]),
        names.dlq,
    }
    rows = re.findall(r"^\| `[^`]+` \| `([^`]+)` \|", section("Redis keys"), re.M)
    assert expected == set(rows)


# -- handshake -----------------------------------------------------------------------


def test_handshake_plaintext() -> None:
    """The handshake plaintext is Ec in base64 with ttl 3600, written as the code writes JSON."""
    _, ec = x25519_public(inputs()["ec_private"])
    body = {"clientEphemeral": base64.b64encode(ec).decode("ascii"), "ttl": 3600}
    assert codec.dumps(body, "j") == block("handshake-plaintext").encode("utf-8")


def test_handshake_aads() -> None:
    """The handshake request and reply AADs are request_aad and reply_aad of the inputs."""
    i = inputs()
    sid, mid = i["sid"], i["handshake_mid"]
    expected = request_aad(ALG_RSA, sid, mid, int(i["handshake_ts"]), HANDSHAKE_TYPE)
    assert expected == block("handshake-request-aad").encode("ascii")
    assert reply_aad(ALG_RSA, sid, mid, "ok") == block("handshake-reply-aad").encode("ascii")


def test_handshake_session_key() -> None:
    """Ec, Ew, the X25519 secret, the HKDF info string and Ks are as the code computes."""
    i = inputs()
    ec_private, ec = x25519_public(i["ec_private"])
    ew_private, ew = x25519_public(i["ew_private"])
    assert hex_block("handshake-ec") == ec
    assert hex_block("handshake-ew") == ew
    assert hex_block("handshake-z") == x25519_shared(ec_private, ew)
    assert hex_block("handshake-z") == x25519_shared(ew_private, ec)
    info = block("handshake-info")
    assert f"sealstream/1 session|{i['sid']}|{ec.hex()}|{ew.hex()}" == info
    assert hex_block("handshake-info-hex") == info.encode("ascii")
    assert hex_block("handshake-ks") == session_key()


# -- a request and its reply ---------------------------------------------------------


def test_sk_keys() -> None:
    """The SK+A256GCM info strings and keys are sk_request_key and sk_reply_key of Ks."""
    mid, ks = inputs()["mid"], session_key()
    assert f"sealstream/1 req {mid}" == block("sk-request-info")
    assert hex_block("sk-request-info-hex") == block("sk-request-info").encode("ascii")
    assert f"sealstream/1 rep {mid}" == block("sk-reply-info")
    assert hex_block("sk-request-key") == sk_request_key(ks, mid)
    assert hex_block("sk-reply-key") == sk_reply_key(ks, mid)


def test_request_aads() -> None:
    """The request AADs (text and hex) are request_aad of the inputs in both algorithms."""
    i = inputs()
    args = (i["sid"], i["mid"], int(i["ts"]), i["type"])
    assert request_aad(ALG_SK, *args) == block("request-aad-sk").encode("ascii")
    assert request_aad(ALG_SK, *args) == hex_block("request-aad-sk-hex")
    assert request_aad(ALG_RSA, *args) == block("request-aad-rsa").encode("ascii")


def test_reply_aads() -> None:
    """The reply AADs are reply_aad of the inputs for ok and error."""
    i = inputs()
    assert reply_aad(ALG_SK, i["sid"], i["mid"], "ok") == block("reply-aad-ok").encode("ascii")
    assert reply_aad(ALG_SK, i["sid"], i["mid"], "ok") == hex_block("reply-aad-ok-hex")
    expected = reply_aad(ALG_SK, i["sid"], i["mid"], "error")
    assert expected == block("reply-aad-error").encode("ascii")


def test_request_seal() -> None:
    """encryptedData and authTag are AES-256-GCM of the plaintext; the documented AAD opens them."""
    i, box = inputs(), sealed_request()
    assert hex_block("request-ciphertext") == box.ciphertext
    assert hex_block("request-tag") == box.tag
    # An independent AES-GCM with the documented key and AAD reads the plaintext back.
    opened = AESGCM(hex_block("sk-request-key")).decrypt(
        bytes.fromhex(i["request_iv"]),
        hex_block("request-ciphertext") + hex_block("request-tag"),
        block("request-aad-sk").encode("ascii"),
    )
    assert i["request_plaintext"].encode("utf-8") == opened


def test_request_entries() -> None:
    """The j and e request entries are what wire.encode_request writes and decode back."""
    j = block("request-entry-j").encode("utf-8")
    e = hex_block("request-entry-e-hex")
    assert {"j": j} == wire.encode_request(example_request("j"))
    assert {"e": e} == wire.encode_request(example_request("e"))
    assert example_request("j") == wire.decode_request({b"j": j})
    assert example_request("e") == wire.decode_request({b"e": e})


def test_reply_entry() -> None:
    """The ok reply entry opens under the reply key to the reply plaintext."""
    i = inputs()
    reply = wire.decode_reply({b"j": block("reply-entry-j").encode("utf-8")})
    assert ("ok", ALG_SK, i["sid"], i["mid"]) == (reply.status, reply.alg, reply.sid, reply.mid)
    assert bytes.fromhex(i["reply_iv"]) == reply.iv
    assert reply.iv is not None and reply.encrypted_data is not None
    assert reply.auth_tag is not None
    box = Sealed(iv=reply.iv, ciphertext=reply.encrypted_data, tag=reply.auth_tag)
    opened = open_sealed(
        sk_reply_key(session_key(), i["mid"]), box, block("reply-aad-ok").encode("ascii")
    )
    assert i["reply_plaintext"].encode("utf-8") == opened
    resealed = seal(
        sk_reply_key(session_key(), i["mid"]),
        opened,
        reply_aad(ALG_SK, i["sid"], i["mid"], "ok"),
        iv=reply.iv,
    )
    assert (reply.encrypted_data, reply.auth_tag) == (resealed.ciphertext, resealed.tag)


def test_notice_entry() -> None:
    """The replay notice entry is what wire.encode_reply writes for a rejected reply."""
    i = inputs()
    notice = wire.Reply(
        field="j", alg=ALG_SK, sid=i["sid"], mid=i["mid"], status="rejected", code="replay"
    )
    assert {"j": block("notice-entry-j").encode("utf-8")} == wire.encode_reply(notice)


# -- session record ------------------------------------------------------------------


def test_session_record_aad() -> None:
    """The KEK id is MasterKey.id, and a sealed record opens under the documented AAD."""
    i = inputs()
    kek = MasterKey(bytes.fromhex(i["kek"]))
    assert block("kek-id") == kek.id
    assert hashlib.sha256(b"sealstream kek id" + kek.key).hexdigest()[:16] == kek.id
    assert f"sealstream/1 session|{i['sid']}|{kek.id}" == block("session-record-aad")
    session = new_session(i["sid"], ks=session_key(), now_ms=int(i["ts"]))
    outer = msgpack.unpackb(seal_record(session, kek), raw=False)
    assert {"v", "kek", "n", "c"} == set(outer)
    assert (1, kek.id, 12) == (outer["v"], outer["kek"], len(outer["n"]))
    # c is the ciphertext followed by the 16-byte tag, as the document says.
    inner = msgpack.unpackb(
        AESGCM(kek.key).decrypt(outer["n"], outer["c"], block("session-record-aad").encode()),
        raw=False,
    )
    assert {"priv", "pub", "ks", "created", "expires"} == set(inner)
    assert session_key() == inner["ks"]
    reopened = open_record(i["sid"], seal_record(session, kek), MasterKeys(kek))
    assert session.expires == reopened.expires


# -- codes ---------------------------------------------------------------------------


@pytest.mark.parametrize("reason", sorted(codes(errors.ProtocolError, "reason")))
def test_dead_letter_reason_is_documented(reason: str) -> None:
    """Every dead-letter reason named in worker.errors is in the document's reason table."""
    assert f"\n| `{reason}` |" in section("Dead letters")


@pytest.mark.parametrize("code", sorted(codes(errors.ProtocolError, "notice")))
def test_notice_code_is_documented(code: str) -> None:
    """Every notice code named in worker.errors is in the document's notice table."""
    assert f"\n| `{code}` |" in section("Notices")


@pytest.mark.parametrize("code", sorted(codes(errors.HandlerFailure, "code")))
def test_error_code_is_documented(code: str) -> None:
    """Every error-reply code named in worker.errors is in the document's error table."""
    assert f"\n| `{code}` |" in section("Reply envelope")


def test_handler_outcome_reasons_are_documented() -> None:
    """The dead-letter reasons of handler outcomes (not ProtocolErrors) are in the table too."""
    for reason in ("handler_error", "timeout"):
        assert f"\n| `{reason}` |" in section("Dead letters")


def test_codes_found_in_errors() -> None:
    """The code lists read from worker.errors are not empty (the introspection works)."""
    assert {"malformed", "replay", "expired"} <= codes(errors.ProtocolError, "reason")
    assert {"rejected", "session_unknown"} <= codes(errors.ProtocolError, "notice")
    assert {"bad_payload", "unknown_type"} <= codes(errors.HandlerFailure, "code")
