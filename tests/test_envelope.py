"""Pure envelope layer: AAD strings, HKDF derivations, seal/open, RSA unwrap, envelopes."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import envelopes, wire
from worker.codec import Field
from worker.crypto import (
    Sealed,
    handshake_session_key,
    hkdf_sha256,
    open_sealed,
    reply_aad,
    request_aad,
    seal,
    sk_reply_key,
    sk_request_key,
    unwrap_key,
    wrap_key,
)
from worker.errors import DecryptError
from worker.protocol import ALG_RSA, ALG_SK, HANDSHAKE_TYPE
from worker.wire import Reply, Request

SID = "9f0c1e2d3c4b5a69788796a5b4c3d2e1"
MID = "5be1a2b3c4d5e6f708192a3b4c5d6e7f"
TS = 1_700_000_000_123

ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
types = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
keys32 = st.binary(min_size=32, max_size=32)
PARTS = ("iv", "ciphertext", "tag", "aad")
T = TypeVar("T", Request, Reply)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """One 2048-bit RSA key for the module (key generation is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    """A second, unrelated 2048-bit RSA key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def flip(data: bytes, bit: int) -> bytes:
    """``data`` with one bit inverted."""
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def altered(value: T, name: str, new: object) -> T:
    """``value`` with the field ``name`` replaced by ``new``."""
    changes: dict[str, Any] = {name: new}
    return dataclasses.replace(value, **changes)


def independent_hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 with an empty salt, straight from cryptography."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"", info=info).derive(ikm)


def rfc5869_hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (empty salt) written out from RFC 5869 with the stdlib only."""
    prk = hmac.new(b"", ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def outgoing(
    alg: str,
    field: Field,
    *,
    public_key: rsa.RSAPublicKey,
    ks: bytes,
    plaintext: bytes = b'{"text":"hello"}',
    sid: str = SID,
    mid: str = MID,
) -> envelopes.Outgoing:
    """A sealed request in ``alg`` and ``field`` encoding."""
    return envelopes.seal_request(
        field=field,
        alg=alg,
        sid=sid,
        mid=mid,
        ts=TS,
        type_="echo",
        plaintext=plaintext,
        public_key=public_key if alg == ALG_RSA else None,
        ks=ks if alg == ALG_SK else None,
    )


# -- AAD ---------------------------------------------------------------------------


def test_request_aad_is_the_spec_string() -> None:
    """The request AAD is ``sealstream/1|req|{alg}|{sid}|{mid}|{ts}|{type}`` in ASCII."""
    expected = (
        b"sealstream/1|req|RSA-OAEP-256+A256GCM|9f0c1e2d3c4b5a69788796a5b4c3d2e1|"
        b"5be1a2b3c4d5e6f708192a3b4c5d6e7f|1700000000123|echo"
    )
    assert expected == request_aad(ALG_RSA, SID, MID, TS, "echo")


def test_reply_aad_is_the_spec_string() -> None:
    """The reply AAD is ``sealstream/1|rep|{alg}|{sid}|{mid}|{status}`` in ASCII."""
    expected = (
        b"sealstream/1|rep|SK+A256GCM|9f0c1e2d3c4b5a69788796a5b4c3d2e1|"
        b"5be1a2b3c4d5e6f708192a3b4c5d6e7f|ok"
    )
    assert expected == reply_aad(ALG_SK, SID, MID, "ok")


@settings(max_examples=100)
@given(
    alg=st.sampled_from([ALG_RSA, ALG_SK]),
    sid=ids,
    mid=ids,
    ts=st.integers(0, 2**53 - 1),
    type_=types,
    status=st.sampled_from(["ok", "error"]),
)
def test_aad_strings_follow_the_spec_for_any_fields(
    alg: str, sid: str, mid: str, ts: int, type_: str, status: str
) -> None:
    """Both AADs are the spec's templates for any well-formed fields, ``ts`` in decimal."""
    expected_req = "|".join(["sealstream/1", "req", alg, sid, mid, str(ts), type_]).encode("ascii")
    expected_rep = "|".join(["sealstream/1", "rep", alg, sid, mid, status]).encode("ascii")
    assert expected_req == request_aad(alg, sid, mid, ts, type_)
    assert expected_rep == reply_aad(alg, sid, mid, status)


# -- HKDF --------------------------------------------------------------------------


def test_hkdf_sha256_matches_rfc5869_test_case_3() -> None:
    """hkdf_sha256 with empty salt and info gives RFC 5869 test case 3's OKM."""
    expected = bytes.fromhex(
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    assert expected == hkdf_sha256(b"\x0b" * 22, b"", 42)


@settings(max_examples=50)
@given(ks=keys32, mid=ids)
def test_sk_request_key_is_hkdf_with_the_spec_info(ks: bytes, mid: str) -> None:
    """The SK request key is HKDF-SHA256(Ks, salt empty, info ``sealstream/1 req <mid>``)."""
    info = f"sealstream/1 req {mid}".encode("ascii")
    assert independent_hkdf(ks, info) == sk_request_key(ks, mid)
    assert rfc5869_hkdf(ks, info) == sk_request_key(ks, mid)


@settings(max_examples=50)
@given(ks=keys32, mid=ids)
def test_sk_reply_key_is_hkdf_with_the_spec_info(ks: bytes, mid: str) -> None:
    """The SK reply key is HKDF-SHA256(Ks, salt empty, info ``sealstream/1 rep <mid>``)."""
    info = f"sealstream/1 rep {mid}".encode("ascii")
    assert independent_hkdf(ks, info) == sk_reply_key(ks, mid)
    assert rfc5869_hkdf(ks, info) == sk_reply_key(ks, mid)


def test_sk_request_and_reply_keys_differ() -> None:
    """The request and reply keys of one mid are distinct, as are keys of two mids."""
    ks = os.urandom(32)
    derived = {
        sk_request_key(ks, MID),
        sk_reply_key(ks, MID),
        sk_request_key(ks, SID),
        sk_reply_key(ks, SID),
    }
    assert 4 == len(derived)


@settings(max_examples=50)
@given(kb=keys32, shared=keys32, sid=ids, ec=keys32, ew=keys32)
def test_handshake_session_key_is_hkdf_with_the_spec_info(
    kb: bytes, shared: bytes, sid: str, ec: bytes, ew: bytes
) -> None:
    """Ks = HKDF(Kb || X25519, salt empty, info ``sealstream/1 session|sid|hex Ec|hex Ew``)."""
    info = f"sealstream/1 session|{sid}|{ec.hex()}|{ew.hex()}".encode("ascii")
    actual = handshake_session_key(
        kb=kb, shared=shared, sid=sid, client_ephemeral=ec, worker_ephemeral=ew
    )
    assert independent_hkdf(kb + shared, info) == actual
    assert rfc5869_hkdf(kb + shared, info) == actual


@pytest.mark.parametrize("changed", ["kb", "shared", "sid", "client_ephemeral", "worker_ephemeral"])
def test_handshake_session_key_binds_every_input(changed: str) -> None:
    """Changing any one input of the handshake derivation changes Ks."""
    inputs: dict[str, bytes | str] = {
        "kb": os.urandom(32),
        "shared": os.urandom(32),
        "sid": SID,
        "client_ephemeral": os.urandom(32),
        "worker_ephemeral": os.urandom(32),
    }
    base = handshake_session_key(**inputs)  # type: ignore[arg-type]
    inputs[changed] = MID if changed == "sid" else os.urandom(32)
    assert base != handshake_session_key(**inputs)  # type: ignore[arg-type]


def test_handshake_session_key_orders_the_ephemerals() -> None:
    """Swapping the client and worker ephemerals gives a different Ks."""
    kb, shared, ec, ew = (os.urandom(32) for _ in range(4))
    one = handshake_session_key(
        kb=kb, shared=shared, sid=SID, client_ephemeral=ec, worker_ephemeral=ew
    )
    two = handshake_session_key(
        kb=kb, shared=shared, sid=SID, client_ephemeral=ew, worker_ephemeral=ec
    )
    assert one != two


# -- seal / open -------------------------------------------------------------------


@settings(max_examples=100)
@given(key=keys32, plaintext=st.binary(max_size=512), aad=st.binary(max_size=128))
def test_seal_then_open_round_trips(key: bytes, plaintext: bytes, aad: bytes) -> None:
    """open_sealed returns the plaintext that seal sealed under the same key and AAD."""
    box = seal(key, plaintext, aad)
    assert (12, len(plaintext), 16) == (len(box.iv), len(box.ciphertext), len(box.tag))
    assert plaintext == open_sealed(key, box, aad)


def test_seal_draws_a_fresh_iv_each_time() -> None:
    """Two seals of the same plaintext use different ivs and ciphertexts."""
    key = os.urandom(32)
    one, two = seal(key, b"same", b"aad"), seal(key, b"same", b"aad")
    assert one.iv != two.iv
    assert one.ciphertext + one.tag != two.ciphertext + two.tag


def test_seal_uses_the_iv_given() -> None:
    """seal with an explicit iv uses it, as AES-256-GCM computes it."""
    key, iv = os.urandom(32), os.urandom(12)
    box = seal(key, b"text", b"aad", iv=iv)
    assert iv == box.iv
    assert b"text" == open_sealed(key, box, b"aad")


@pytest.mark.parametrize(("key_len", "iv_len"), [(16, 12), (24, 12), (31, 12), (32, 8), (32, 16)])
def test_seal_refuses_wrong_key_or_iv_lengths(key_len: int, iv_len: int) -> None:
    """seal refuses anything but a 32-byte key and a 12-byte iv with ValueError."""
    with pytest.raises(ValueError):
        seal(os.urandom(key_len), b"text", b"aad", iv=os.urandom(iv_len))


@settings(max_examples=200)
@given(
    key=keys32,
    plaintext=st.binary(min_size=1, max_size=256),
    aad=st.binary(min_size=1, max_size=64),
    part=st.sampled_from(PARTS),
    data=st.data(),
)
def test_flipping_any_bit_fails_with_decrypt_error(
    key: bytes, plaintext: bytes, aad: bytes, part: str, data: st.DataObject
) -> None:
    """Flipping one bit anywhere in iv, ciphertext, tag or AAD raises DecryptError."""
    box = seal(key, plaintext, aad)
    values = {"iv": box.iv, "ciphertext": box.ciphertext, "tag": box.tag, "aad": aad}
    bit = data.draw(st.integers(0, len(values[part]) * 8 - 1), label="bit")
    values[part] = flip(values[part], bit)
    tampered = Sealed(iv=values["iv"], ciphertext=values["ciphertext"], tag=values["tag"])
    with pytest.raises(DecryptError):
        open_sealed(key, tampered, values["aad"])


@settings(max_examples=100)
@given(
    key=keys32,
    plaintext=st.binary(min_size=1, max_size=64),
    part=st.sampled_from(PARTS),
    extra=st.binary(min_size=1, max_size=4),
    truncate=st.booleans(),
)
def test_truncating_or_extending_any_part_fails_with_decrypt_error(
    key: bytes, plaintext: bytes, part: str, extra: bytes, truncate: bool
) -> None:
    """Dropping the last byte of, or appending bytes to, any part raises DecryptError."""
    box = seal(key, plaintext, b"aad")
    values = {"iv": box.iv, "ciphertext": box.ciphertext, "tag": box.tag, "aad": b"aad"}
    values[part] = values[part][:-1] if truncate else values[part] + extra
    tampered = Sealed(iv=values["iv"], ciphertext=values["ciphertext"], tag=values["tag"])
    with pytest.raises(DecryptError):
        open_sealed(key, tampered, values["aad"])


def test_open_with_another_key_fails_with_decrypt_error() -> None:
    """A box opened under a different key raises DecryptError."""
    box = seal(os.urandom(32), b"text", b"aad")
    with pytest.raises(DecryptError):
        open_sealed(os.urandom(32), box, b"aad")


@pytest.mark.parametrize(
    ("key_len", "iv_len", "tag_len"),
    [(16, 12, 16), (0, 12, 16), (32, 8, 16), (32, 0, 16), (32, 16, 16), (32, 12, 12), (32, 12, 0)],
)
def test_open_refuses_wrong_lengths_with_decrypt_error(
    key_len: int, iv_len: int, tag_len: int
) -> None:
    """Wrong key, iv or tag lengths raise the same DecryptError, never ValueError."""
    box = Sealed(iv=os.urandom(iv_len), ciphertext=b"data", tag=os.urandom(tag_len))
    with pytest.raises(DecryptError):
        open_sealed(os.urandom(key_len), box, b"aad")


def test_decrypt_error_is_opaque() -> None:
    """Every open failure has the same message and no chained cause or context."""
    key = os.urandom(32)
    box = seal(key, b"text", b"aad")
    failures = [
        (os.urandom(32), box, b"aad"),
        (key, box, b"other"),
        (key, dataclasses.replace(box, tag=bytes(16)), b"aad"),
        (key, dataclasses.replace(box, iv=b"short"), b"aad"),
        (b"short", box, b"aad"),
    ]
    messages_seen = set()
    for k, b, a in failures:
        with pytest.raises(DecryptError) as err:
            open_sealed(k, b, a)
        assert err.value.__cause__ is None
        assert err.value.__suppress_context__
        messages_seen.add(str(err.value))
    assert 1 == len(messages_seen)


# -- RSA unwrap --------------------------------------------------------------------


def test_wrap_then_unwrap_round_trips(rsa_key: rsa.RSAPrivateKey) -> None:
    """A 32-byte key wrapped under the public key unwraps to itself."""
    key = os.urandom(32)
    wrapped = wrap_key(rsa_key.public_key(), key)
    assert 256 == len(wrapped)
    assert key == unwrap_key(rsa_key, wrapped)


@settings(max_examples=50, deadline=None)
@given(garbage=st.one_of(st.binary(max_size=300), st.binary(min_size=256, max_size=256)))
def test_unwrap_of_garbage_returns_a_random_key(rsa_key: rsa.RSAPrivateKey, garbage: bytes) -> None:
    """unwrap_key of garbage never raises and returns a fresh random 32-byte key."""
    one, two = unwrap_key(rsa_key, garbage), unwrap_key(rsa_key, garbage)
    assert 32 == len(one)
    assert 32 == len(two)
    assert one != two


@settings(max_examples=50, deadline=None)
@given(garbage=st.binary(min_size=256, max_size=256), plaintext=st.binary(max_size=64))
def test_open_after_garbage_unwrap_fails_with_decrypt_error(
    rsa_key: rsa.RSAPrivateKey, garbage: bytes, plaintext: bytes
) -> None:
    """A box opened with the key unwrapped from garbage raises DecryptError."""
    box = seal(os.urandom(32), plaintext, b"aad")
    with pytest.raises(DecryptError):
        open_sealed(unwrap_key(rsa_key, garbage), box, b"aad")


@pytest.mark.parametrize("length", [0, 1, 16, 31, 33, 64])
def test_unwrap_of_a_key_of_the_wrong_length_returns_a_random_key(
    rsa_key: rsa.RSAPrivateKey, length: int
) -> None:
    """A correctly wrapped value that is not 32 bytes unwraps to a random 32-byte key."""
    inner = os.urandom(length)
    wrapped = wrap_key(rsa_key.public_key(), inner)
    one, two = unwrap_key(rsa_key, wrapped), unwrap_key(rsa_key, wrapped)
    assert 32 == len(one)
    assert inner != one
    assert one != two


def test_unwrap_under_another_key_returns_a_random_key(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    """A key wrapped for another RSA key unwraps to a random key, not the original."""
    key = os.urandom(32)
    wrapped = wrap_key(other_rsa_key.public_key(), key)
    actual = unwrap_key(rsa_key, wrapped)
    assert 32 == len(actual)
    assert key != actual


# -- messages: requests ------------------------------------------------------------


@pytest.mark.parametrize("field", ["e", "j"])
@pytest.mark.parametrize("alg", [ALG_RSA, ALG_SK])
def test_seal_request_then_open_request_round_trips(
    rsa_key: rsa.RSAPrivateKey, alg: str, field: Field
) -> None:
    """open_request returns the sealed plaintext and the client's reply key."""
    ks = os.urandom(32)
    out = outgoing(alg, field, public_key=rsa_key.public_key(), ks=ks)
    opened = envelopes.open_request(out.request, private_key=rsa_key, ks=ks)
    assert b'{"text":"hello"}' == opened.plaintext
    assert out.reply_key == opened.reply_key


def test_rsa_request_carries_a_wrapped_key_and_sk_request_does_not(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    """RSA mode sets encryptedAesKey (modulus size); SK mode leaves it out."""
    ks = os.urandom(32)
    rsa_out = outgoing(ALG_RSA, "e", public_key=rsa_key.public_key(), ks=ks)
    sk_out = outgoing(ALG_SK, "e", public_key=rsa_key.public_key(), ks=ks)
    assert rsa_out.request.encrypted_aes_key is not None
    assert 256 == len(rsa_out.request.encrypted_aes_key)
    assert sk_out.request.encrypted_aes_key is None
    assert sk_reply_key(ks, MID) == sk_out.reply_key


def test_rsa_request_with_given_key_uses_it(rsa_key: rsa.RSAPrivateKey) -> None:
    """A handshake-style request sealed with ``key=Kb`` wraps Kb and replies under it."""
    kb = os.urandom(32)
    out = envelopes.seal_request(
        field="e",
        alg=ALG_RSA,
        sid=SID,
        mid=MID,
        ts=TS,
        type_=HANDSHAKE_TYPE,
        plaintext=b"hello",
        public_key=rsa_key.public_key(),
        kid="ab" * 32,
        key=kb,
    )
    assert kb == out.reply_key
    assert "ab" * 32 == out.request.kid
    assert kb == envelopes.open_request(out.request, private_key=rsa_key).reply_key


@settings(max_examples=50, deadline=None)
@given(
    alg=st.sampled_from([ALG_RSA, ALG_SK]),
    part=st.sampled_from(["iv", "encrypted_data", "auth_tag", "encrypted_aes_key"]),
    data=st.data(),
)
def test_flipping_any_bit_of_a_request_fails_to_open(
    rsa_key: rsa.RSAPrivateKey, alg: str, part: str, data: st.DataObject
) -> None:
    """A request with one bit flipped in iv, data, tag or wrapped key raises DecryptError."""
    ks = os.urandom(32)
    request = outgoing(alg, "e", public_key=rsa_key.public_key(), ks=ks).request
    if part == "encrypted_aes_key" and alg == ALG_SK:
        part = "encrypted_data"
    value: bytes = getattr(request, part)
    bit = data.draw(st.integers(0, len(value) * 8 - 1), label="bit")
    tampered = altered(request, part, flip(value, bit))
    with pytest.raises(DecryptError):
        envelopes.open_request(tampered, private_key=rsa_key, ks=ks)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("sid", "0" * 32),
        ("mid", "f" * 32),
        ("ts", TS + 1),
        ("type", "echo2"),
        ("alg", "other"),
    ],
)
@pytest.mark.parametrize("alg", [ALG_RSA, ALG_SK])
def test_changing_any_aad_field_of_a_request_fails_to_open(
    rsa_key: rsa.RSAPrivateKey, alg: str, name: str, value: str | int
) -> None:
    """A request whose sid, mid, ts, type or alg was altered raises DecryptError."""
    ks = os.urandom(32)
    request = outgoing(alg, "e", public_key=rsa_key.public_key(), ks=ks).request
    if name == "alg":
        value = ALG_SK if alg == ALG_RSA else ALG_RSA
    tampered = altered(request, name, value)
    with pytest.raises(DecryptError):
        envelopes.open_request(tampered, private_key=rsa_key, ks=ks)


def test_rsa_request_with_garbage_wrapped_key_fails_like_a_bad_tag(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    """An unwrap failure and a tag failure raise the same opaque DecryptError."""
    request = outgoing(ALG_RSA, "e", public_key=rsa_key.public_key(), ks=b"").request
    garbage = dataclasses.replace(request, encrypted_aes_key=os.urandom(256))
    bad_tag = dataclasses.replace(request, auth_tag=bytes(16))
    with pytest.raises(DecryptError) as unwrap_failure:
        envelopes.open_request(garbage, private_key=rsa_key)
    with pytest.raises(DecryptError) as tag_failure:
        envelopes.open_request(bad_tag, private_key=rsa_key)
    assert str(tag_failure.value) == str(unwrap_failure.value)
    assert unwrap_failure.value.__cause__ is None
    assert unwrap_failure.value.__suppress_context__


def test_open_request_with_the_wrong_secrets_fails(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    """The wrong private key, the wrong Ks, or no key at all raise DecryptError."""
    ks = os.urandom(32)
    rsa_request = outgoing(ALG_RSA, "e", public_key=rsa_key.public_key(), ks=ks).request
    sk_request = outgoing(ALG_SK, "e", public_key=rsa_key.public_key(), ks=ks).request
    attempts: list[tuple[Request, rsa.RSAPrivateKey | None, bytes | None]] = [
        (rsa_request, other_rsa_key, None),
        (rsa_request, None, ks),
        (dataclasses.replace(rsa_request, encrypted_aes_key=None), rsa_key, None),
        (sk_request, None, os.urandom(32)),
        (sk_request, rsa_key, None),
    ]
    for request, private_key, key in attempts:
        with pytest.raises(DecryptError):
            envelopes.open_request(request, private_key=private_key, ks=key)


def test_seal_request_needs_the_key_of_its_alg() -> None:
    """Sealing RSA without a public key, or SK without Ks, raises ValueError."""
    common = {"field": "e", "sid": SID, "mid": MID, "ts": TS, "type_": "echo", "plaintext": b""}
    with pytest.raises(ValueError):
        envelopes.seal_request(alg=ALG_RSA, ks=os.urandom(32), **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        envelopes.seal_request(alg=ALG_SK, **common)  # type: ignore[arg-type]


def test_opened_and_outgoing_reprs_hide_secrets(rsa_key: rsa.RSAPrivateKey) -> None:
    """The repr of Opened and Outgoing never shows the plaintext or the reply key."""
    ks = os.urandom(32)
    out = outgoing(ALG_SK, "e", public_key=rsa_key.public_key(), ks=ks, plaintext=b"secret!")
    opened = envelopes.open_request(out.request, ks=ks)
    for text in (repr(opened), repr(out)):
        assert "secret!" not in text
        assert repr(out.reply_key) not in text
        assert out.reply_key.hex() not in text


# -- messages: replies -------------------------------------------------------------


@pytest.mark.parametrize("status", ["ok", "error"])
@pytest.mark.parametrize("field", ["e", "j"])
@pytest.mark.parametrize("alg", [ALG_RSA, ALG_SK])
def test_seal_reply_then_open_reply_round_trips(
    rsa_key: rsa.RSAPrivateKey, alg: str, field: Field, status: str
) -> None:
    """A reply sealed with the opened request's key opens with the client's reply key."""
    ks = os.urandom(32)
    out = outgoing(alg, field, public_key=rsa_key.public_key(), ks=ks)
    opened = envelopes.open_request(out.request, private_key=rsa_key, ks=ks)
    reply = envelopes.seal_reply(out.request, opened.reply_key, status, b"result")
    assert (field, alg, SID, MID, status) == (
        reply.field,
        reply.alg,
        reply.sid,
        reply.mid,
        reply.status,
    )
    assert reply.iv is not None
    assert out.request.iv != reply.iv
    assert b"result" == envelopes.open_reply(reply, reply_key=out.reply_key, request=out.request)


@pytest.mark.parametrize("status", ["ok", "error"])
@pytest.mark.parametrize("field", ["e", "j"])
@pytest.mark.parametrize("alg", [ALG_RSA, ALG_SK])
def test_seal_reply_entry_is_the_encoded_sealed_reply(
    rsa_key: rsa.RSAPrivateKey, alg: str, field: Field, status: str
) -> None:
    """The worker's one-step reply entry is byte for byte the sealed reply, encoded."""
    out = outgoing(alg, field, public_key=rsa_key.public_key(), ks=os.urandom(32))
    iv = os.urandom(12)
    sealed = envelopes.seal_reply(out.request, out.reply_key, status, b"result", iv=iv)
    entry = envelopes.seal_reply_entry(out.request, out.reply_key, status, b"result", iv=iv)
    assert wire.encode_reply(sealed) == entry


@pytest.mark.parametrize("both", [False, True], ids=["reply-only", "reply-and-request"])
@pytest.mark.parametrize("name", ["sid", "mid", "alg"])
@pytest.mark.parametrize("alg", [ALG_RSA, ALG_SK])
def test_reply_opened_against_another_request_fails(
    rsa_key: rsa.RSAPrivateKey, alg: str, name: str, both: bool
) -> None:
    """A reply whose sid, mid or alg is another request's raises DecryptError.

    With ``both`` the request is changed too, so only the AAD can catch it.
    """
    ks = os.urandom(32)
    out = outgoing(alg, "e", public_key=rsa_key.public_key(), ks=ks)
    reply = envelopes.seal_reply(out.request, out.reply_key, "ok", b"result")
    other = {"sid": "0" * 32, "mid": "f" * 32, "alg": ALG_SK if alg == ALG_RSA else ALG_RSA}[name]
    moved = altered(reply, name, other)
    request = altered(out.request, name, other) if both else out.request
    with pytest.raises(DecryptError):
        envelopes.open_reply(moved, reply_key=out.reply_key, request=request)


@pytest.mark.parametrize(("sealed_as", "claimed"), [("ok", "error"), ("error", "ok")])
@pytest.mark.parametrize("alg", [ALG_RSA, ALG_SK])
def test_reply_with_another_status_fails(
    rsa_key: rsa.RSAPrivateKey, alg: str, sealed_as: str, claimed: str
) -> None:
    """Relabelling an ``ok`` reply as ``error`` (or back) raises DecryptError."""
    ks = os.urandom(32)
    out = outgoing(alg, "e", public_key=rsa_key.public_key(), ks=ks)
    reply = envelopes.seal_reply(out.request, out.reply_key, sealed_as, b"result")
    with pytest.raises(DecryptError):
        envelopes.open_reply(
            dataclasses.replace(reply, status=claimed), reply_key=out.reply_key, request=out.request
        )


def test_reply_to_another_request_of_the_same_session_fails(rsa_key: rsa.RSAPrivateKey) -> None:
    """A genuine reply to one request does not open as the reply to another (SK mode)."""
    ks = os.urandom(32)
    first = outgoing(ALG_SK, "e", public_key=rsa_key.public_key(), ks=ks, mid=MID)
    second = outgoing(ALG_SK, "e", public_key=rsa_key.public_key(), ks=ks, mid="1" * 32)
    reply = envelopes.seal_reply(first.request, first.reply_key, "ok", b"result")
    spliced = dataclasses.replace(reply, mid=second.request.mid)
    with pytest.raises(DecryptError):
        envelopes.open_reply(spliced, reply_key=second.reply_key, request=second.request)


@pytest.mark.parametrize("status", ["ok", "error"])
@pytest.mark.parametrize("alg", [ALG_RSA, ALG_SK])
def test_reflected_request_does_not_open_as_a_reply(
    rsa_key: rsa.RSAPrivateKey, alg: str, status: str
) -> None:
    """A request's own ciphertext presented as its reply raises DecryptError."""
    ks = os.urandom(32)
    out = outgoing(alg, "e", public_key=rsa_key.public_key(), ks=ks)
    reflected = Reply(
        field=out.request.field,
        alg=out.request.alg,
        sid=out.request.sid,
        mid=out.request.mid,
        status=status,
        iv=out.request.iv,
        encrypted_data=out.request.encrypted_data,
        auth_tag=out.request.auth_tag,
    )
    with pytest.raises(DecryptError):
        envelopes.open_reply(reflected, reply_key=out.reply_key, request=out.request)


@pytest.mark.parametrize("alg", [ALG_RSA, ALG_SK])
def test_reflected_reply_does_not_open_as_a_request(rsa_key: rsa.RSAPrivateKey, alg: str) -> None:
    """A reply's ciphertext presented as a request with the same ids raises DecryptError."""
    ks = os.urandom(32)
    out = outgoing(alg, "e", public_key=rsa_key.public_key(), ks=ks)
    reply = envelopes.seal_reply(out.request, out.reply_key, "ok", b"result")
    assert reply.iv is not None and reply.encrypted_data is not None and reply.auth_tag is not None
    reflected = dataclasses.replace(
        out.request, iv=reply.iv, encrypted_data=reply.encrypted_data, auth_tag=reply.auth_tag
    )
    with pytest.raises(DecryptError):
        envelopes.open_request(reflected, private_key=rsa_key, ks=ks)


@pytest.mark.parametrize("missing", ["iv", "encrypted_data", "auth_tag"])
def test_reply_without_ciphertext_fails(rsa_key: rsa.RSAPrivateKey, missing: str) -> None:
    """A reply lacking iv, ciphertext or tag raises DecryptError."""
    ks = os.urandom(32)
    out = outgoing(ALG_SK, "e", public_key=rsa_key.public_key(), ks=ks)
    reply = envelopes.seal_reply(out.request, out.reply_key, "ok", b"result")
    with pytest.raises(DecryptError):
        envelopes.open_reply(
            altered(reply, missing, None), reply_key=out.reply_key, request=out.request
        )


def test_notice_is_an_unauthenticated_rejected_reply() -> None:
    """notice builds a ``rejected`` reply with the code and no ciphertext."""
    actual = envelopes.notice(field="j", sid=SID, mid=MID, code="replay", alg=None)
    assert Reply(field="j", sid=SID, mid=MID, status="rejected", code="replay") == actual
