"""Wycheproof vectors against the envelope layer's use of RSA-OAEP, AES-GCM and X25519.

Used as ``tests/vectors/README.md`` says: they test how the envelope layer
uses the primitives (parameters, length checks, the single opaque failure path),
not the primitives themselves.
"""

from __future__ import annotations

import base64
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker import envelopes, wire
from worker.crypto import _OAEP, Sealed, open_sealed, request_aad, seal, unwrap_key, x25519_shared
from worker.errors import DecryptError, Malformed
from worker.protocol import ALG_RSA, ALG_SK
from worker.wire import Request

# Copied into the repository with their license and origin (tests/vectors/README.md).
VECTORS = Path(__file__).parent / "vectors" / "wycheproof"

SID = "9f0c1e2d3c4b5a69788796a5b4c3d2e1"
MID = "5be1a2b3c4d5e6f708192a3b4c5d6e7f"
TS = 1_700_000_000_123
OAEP_SHA256 = {
    2048: "rsa_oaep_2048_sha256_mgf1sha256_test.json",
    3072: "rsa_oaep_3072_sha256_mgf1sha256_test.json",
}
OAEP_SHA1 = "rsa_oaep_2048_sha1_mgf1sha1_test.json"


@functools.cache
def load(name: str) -> dict[str, Any]:
    """A vector file, parsed."""
    data: dict[str, Any] = json.loads((VECTORS / name).read_text("utf-8"))
    return data


@functools.cache
def rsa_private_key(name: str) -> rsa.RSAPrivateKey:
    """The file's RSA private key, given as PKCS#8 DER hex at group level."""
    (group,) = load(name)["testGroups"]
    key = serialization.load_der_private_key(bytes.fromhex(group["privateKeyPkcs8"]), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def cases(name: str, **group_filter: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every (group, test case) of a file whose group matches ``group_filter``."""
    return [
        (group, case)
        for group in load(name)["testGroups"]
        if all(group.get(k) == v for k, v in group_filter.items())
        for case in group["tests"]
    ]


def h(value: str) -> bytes:
    """Bytes from a vector's hex string."""
    return bytes.fromhex(value)


# -- RSA-OAEP (SHA-256, MGF1-SHA-256) ----------------------------------------------


Case = dict[str, Any]
Predicate = Callable[[Case], bool]


def oaep_params(predicate: Predicate) -> list[Any]:
    """pytest params (file, case) over both SHA-256 OAEP files, id ``<bits>-tc<tcId>``."""
    return [
        pytest.param(name, case, id=f"{bits}-tc{case['tcId']}")
        for bits, name in OAEP_SHA256.items()
        for _, case in cases(name)
        if predicate(case)
    ]


def unwraps_to_msg(case: dict[str, Any]) -> bool:
    """Whether the worker's unwrap must return the case's msg as the key."""
    return case["result"] == "valid" and case["label"] == "" and len(h(case["msg"])) == 32


def test_the_vector_files_cover_what_the_tests_need() -> None:
    """Each OAEP file has a valid 32-byte-msg case; the AES file has AES-256/96/128 groups."""
    for name in OAEP_SHA256.values():
        assert any(unwraps_to_msg(case) for _, case in cases(name))
    assert [] != cases("aes_gcm_test.json", keySize=256, ivSize=96, tagSize=128)


@pytest.mark.parametrize(
    ("name", "case"),
    oaep_params(lambda c: c["result"] == "valid" and c["label"] == ""),
)
def test_worker_oaep_parameters_decrypt_valid_case(name: str, case: dict[str, Any]) -> None:
    """The worker's OAEP parameters decrypt every valid empty-label case to its msg."""
    assert h(case["msg"]) == rsa_private_key(name).decrypt(h(case["ct"]), _OAEP)


@pytest.mark.parametrize(
    ("name", "case"),
    oaep_params(lambda c: c["result"] == "valid" and c["label"] != ""),
)
def test_worker_oaep_hashes_decrypt_labelled_case_only_with_its_label(
    name: str, case: dict[str, Any]
) -> None:
    """A labelled valid case decrypts under the worker's hashes plus its label, never without.

    The protocol fixes an empty label, so the worker's own parameters must refuse it.
    """
    key = rsa_private_key(name)
    with_label = padding.OAEP(mgf=_OAEP.mgf, algorithm=_OAEP.algorithm, label=h(case["label"]))
    assert h(case["msg"]) == key.decrypt(h(case["ct"]), with_label)
    with pytest.raises(ValueError):
        key.decrypt(h(case["ct"]), _OAEP)


@pytest.mark.parametrize(("name", "case"), oaep_params(unwraps_to_msg))
def test_unwrap_key_of_valid_32_byte_case_gives_its_msg(name: str, case: dict[str, Any]) -> None:
    """unwrap_key returns the msg of a valid case whose msg is a 32-byte key."""
    assert h(case["msg"]) == unwrap_key(rsa_private_key(name), h(case["ct"]))


@pytest.mark.parametrize(("name", "case"), oaep_params(lambda c: not unwraps_to_msg(c)))
def test_unwrap_key_of_any_other_case_gives_a_random_key(name: str, case: dict[str, Any]) -> None:
    """Invalid cases and valid non-32-byte or labelled ones unwrap to fresh random 32 bytes."""
    key = rsa_private_key(name)
    one, two = unwrap_key(key, h(case["ct"])), unwrap_key(key, h(case["ct"]))
    assert 32 == len(one)
    assert 32 == len(two)
    assert h(case["msg"]) != one
    assert one != two


def rsa_request(wrapped: bytes, k: bytes) -> Request:
    """An RSA-mode request with ``wrapped`` as encryptedAesKey, sealed under ``k``."""
    box = seal(k, b'{"n":1}', request_aad(ALG_RSA, SID, MID, TS, "echo"))
    return Request(
        field="e",
        alg=ALG_RSA,
        sid=SID,
        mid=MID,
        ts=TS,
        type="echo",
        iv=box.iv,
        encrypted_data=box.ciphertext,
        auth_tag=box.tag,
        encrypted_aes_key=wrapped,
    )


@pytest.mark.parametrize(("name", "case"), oaep_params(unwraps_to_msg))
def test_open_request_with_valid_vector_wrapped_key_opens(name: str, case: dict[str, Any]) -> None:
    """A request whose encryptedAesKey is a valid 32-byte vector case opens under its msg."""
    request = rsa_request(h(case["ct"]), h(case["msg"]))
    opened = envelopes.open_request(request, private_key=rsa_private_key(name))
    assert b'{"n":1}' == opened.plaintext
    assert h(case["msg"]) == opened.reply_key


@pytest.mark.parametrize(("name", "case"), oaep_params(lambda c: c["result"] == "invalid"))
def test_open_request_with_invalid_vector_wrapped_key_fails_opaquely(
    name: str, case: dict[str, Any]
) -> None:
    """A request whose encryptedAesKey is an invalid case raises the tag-failure DecryptError."""
    key = rsa_private_key(name)
    request = rsa_request(h(case["ct"]), os.urandom(32))
    with pytest.raises(DecryptError) as unwrap_failure:
        envelopes.open_request(request, private_key=key)
    assert unwrap_failure.value.__cause__ is None
    assert unwrap_failure.value.__suppress_context__
    assert "cannot open" == str(unwrap_failure.value)


# -- RSA-OAEP with SHA-1 (Node's publicEncrypt default) ----------------------------


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=f"tc{case['tcId']}") for _, case in cases(OAEP_SHA1)]
)
def test_sha1_oaep_ciphertext_never_unwraps_to_its_msg(case: dict[str, Any]) -> None:
    """A SHA-1 OAEP ciphertext is refused by our SHA-256 parameters: a random key results."""
    key = rsa_private_key(OAEP_SHA1)
    actual = unwrap_key(key, h(case["ct"]))
    assert 32 == len(actual)
    assert h(case["msg"]) != actual
    with pytest.raises(ValueError):
        key.decrypt(h(case["ct"]), _OAEP)


# -- AES-256-GCM -------------------------------------------------------------------


def gcm_params(predicate: Predicate, **group_filter: int) -> list[Any]:
    """pytest params over the AES-GCM cases whose group matches, id ``tc<tcId>``."""
    return [
        pytest.param(case, id=f"tc{case['tcId']}")
        for _, case in cases("aes_gcm_test.json", **group_filter)
        if predicate(case)
    ]


def sealed(case: dict[str, Any]) -> Sealed:
    """The case's iv, ct and tag as a Sealed box."""
    return Sealed(iv=h(case["iv"]), ciphertext=h(case["ct"]), tag=h(case["tag"]))


AES_256_96_128 = {"keySize": 256, "ivSize": 96, "tagSize": 128}


@pytest.mark.parametrize("case", gcm_params(lambda c: c["result"] == "valid", **AES_256_96_128))
def test_open_sealed_opens_valid_aes_256_gcm_case(case: dict[str, Any]) -> None:
    """open_sealed returns the msg of every valid AES-256, 96-bit iv, 128-bit tag case."""
    assert h(case["msg"]) == open_sealed(h(case["key"]), sealed(case), h(case["aad"]))


@pytest.mark.parametrize("case", gcm_params(lambda c: c["result"] == "invalid", **AES_256_96_128))
def test_open_sealed_refuses_invalid_aes_256_gcm_case(case: dict[str, Any]) -> None:
    """open_sealed raises DecryptError for every invalid AES-256, 96-bit iv case."""
    with pytest.raises(DecryptError):
        open_sealed(h(case["key"]), sealed(case), h(case["aad"]))


def envelope_entry(field: wire.Field, iv: bytes, data: bytes, tag: bytes) -> dict[bytes, bytes]:
    """An otherwise well-formed SK request entry carrying the given iv, data and tag."""
    env: dict[str, Any] = {
        "v": 1,
        "alg": ALG_SK,
        "sid": SID,
        "mid": MID,
        "ts": TS,
        "type": "echo",
        "iv": iv,
        "encryptedData": data,
        "authTag": tag,
    }
    if field == "e":
        return {b"e": msgpack.packb(env, use_bin_type=True)}
    for name in ("iv", "encryptedData", "authTag"):
        env[name] = base64.b64encode(env[name]).decode("ascii")
    return {b"j": json.dumps(env, separators=(",", ":")).encode("utf-8")}


def other_iv_cases() -> list[Any]:
    """AES-256 cases whose iv is not 96 bits, id ``tc<tcId>``."""
    return [
        pytest.param(case, id=f"tc{case['tcId']}")
        for group, case in cases("aes_gcm_test.json", keySize=256)
        if group["ivSize"] != 96
    ]


def test_control_envelope_entry_decodes() -> None:
    """The entry builder gives an entry decode_request accepts when the sizes are right."""
    for field in ("e", "j"):
        request = wire.decode_request(envelope_entry(field, bytes(12), b"x", bytes(16)))
        assert (bytes(12), b"x", bytes(16)) == (
            request.iv,
            request.encrypted_data,
            request.auth_tag,
        )


@pytest.mark.parametrize("field", ["e", "j"])
@pytest.mark.parametrize("case", other_iv_cases())
def test_wire_refuses_other_iv_sizes(case: dict[str, Any], field: wire.Field) -> None:
    """decode_request refuses an envelope whose iv is not 12 bytes with Malformed."""
    entry = envelope_entry(field, h(case["iv"]), h(case["ct"]), h(case["tag"]))
    with pytest.raises(Malformed):
        wire.decode_request(entry)


@pytest.mark.parametrize("case", other_iv_cases())
def test_open_sealed_refuses_other_iv_sizes_before_decrypting(case: dict[str, Any]) -> None:
    """open_sealed refuses a non-12-byte iv with DecryptError, even where GCM would succeed.

    The control decrypts valid cases directly (AESGCM takes 8..128-byte nonces), so the
    refusal can only come from the envelope's own length check.
    """
    key, iv = h(case["key"]), h(case["iv"])
    if case["result"] == "valid" and 8 <= len(iv) <= 128:
        direct = AESGCM(key).decrypt(iv, h(case["ct"]) + h(case["tag"]), h(case["aad"]))
        assert h(case["msg"]) == direct
    with pytest.raises(DecryptError):
        open_sealed(key, sealed(case), h(case["aad"]))


SHORT_TAG_CASES = gcm_params(lambda c: c["result"] == "valid", **AES_256_96_128)[:4]


@pytest.mark.parametrize("tag_len", [0, 4, 8, 12, 15, 17])
@pytest.mark.parametrize("case", SHORT_TAG_CASES)
def test_other_tag_sizes_are_refused_by_wire_and_open(case: dict[str, Any], tag_len: int) -> None:
    """A tag cut (or padded) from 16 bytes is refused: Malformed on the wire, DecryptError open."""
    tag = (h(case["tag"]) + b"\x00")[:tag_len]
    for field in ("e", "j"):
        with pytest.raises(Malformed):
            wire.decode_request(envelope_entry(field, h(case["iv"]), h(case["ct"]), tag))
    box = Sealed(iv=h(case["iv"]), ciphertext=h(case["ct"]), tag=tag)
    with pytest.raises(DecryptError):
        open_sealed(h(case["key"]), box, h(case["aad"]))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, id=f"aes{group['keySize']}-tc{case['tcId']}")
        for group, case in cases("aes_gcm_test.json", ivSize=96)
        if group["keySize"] != 256 and case["result"] == "valid"
    ],
)
def test_open_sealed_refuses_aes_128_and_192_keys(case: dict[str, Any]) -> None:
    """A valid AES-128/192 case is refused with DecryptError: the envelope is AES-256 only."""
    with pytest.raises(DecryptError):
        open_sealed(h(case["key"]), sealed(case), h(case["aad"]))


# -- X25519 ------------------------------------------------------------------------


def x25519_params(predicate: Predicate) -> list[Any]:
    """pytest params over the X25519 cases matching ``predicate``, id ``tc<tcId>``."""
    return [
        pytest.param(case, id=f"tc{case['tcId']}")
        for _, case in cases("x25519_test.json")
        if predicate(case)
    ]


ZERO = "00" * 32


def agree(case: dict[str, Any]) -> bytes:
    """x25519_shared of the case's private key and public value."""
    private = x25519.X25519PrivateKey.from_private_bytes(h(case["private"]))
    return x25519_shared(private, h(case["public"]))


@pytest.mark.parametrize("case", x25519_params(lambda c: c["result"] == "valid"))
def test_x25519_shared_computes_valid_case(case: dict[str, Any]) -> None:
    """x25519_shared gives the shared secret of every valid case."""
    assert h(case["shared"]) == agree(case)


@pytest.mark.parametrize("case", x25519_params(lambda c: c["shared"] == ZERO))
def test_x25519_shared_refuses_low_order_public(case: dict[str, Any]) -> None:
    """A peer value giving an all-zero shared secret (low order) raises ValueError."""
    with pytest.raises(ValueError):
        agree(case)


@pytest.mark.parametrize(
    "case", x25519_params(lambda c: c["result"] == "acceptable" and c["shared"] != ZERO)
)
def test_x25519_shared_accepts_acceptable_nonzero_case(case: dict[str, Any]) -> None:
    """Twist and non-canonical peer values are accepted and give RFC 7748's shared secret.

    RFC 7748 lets implementations accept them; only the all-zero result is refused.
    Ks also mixes in Kb, so such a point cannot make the session key predictable.
    """
    assert h(case["shared"]) == agree(case)


@pytest.mark.parametrize("length", [0, 31, 33, 56])
def test_x25519_shared_refuses_wrong_length_public(length: int) -> None:
    """A peer value that is not 32 bytes raises ValueError."""
    with pytest.raises(ValueError):
        x25519_shared(x25519.X25519PrivateKey.generate(), os.urandom(length))
