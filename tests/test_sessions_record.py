"""Sealed session records, master keys (KEKs) and key files. Pure: no Redis."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import ConfigError, DecryptError
from worker.keys import (
    MasterKey,
    MasterKeys,
    ServiceKey,
    load_master_key_file,
    load_service_key,
    parse_master_keys,
    write_keys,
)
from worker.sessions import (
    MAX_TTL_S,
    MIN_TTL_S,
    Session,
    clamp_ttl,
    new_session,
    open_record,
    seal_record,
)

SID = "9f0c1e2d3c4b5a69788796a5b4c3d2e1"
OTHER_SID = "0123456789abcdef0123456789abcdef"
NOW = 1_700_000_000_000


@pytest.fixture(scope="module")
def session() -> Session:
    """One session (2048-bit RSA pair) for the module; key generation is slow."""
    return new_session(SID, ks=os.urandom(32), now_ms=NOW, ttl_s=600)


@pytest.fixture(scope="module")
def kek() -> MasterKey:
    """The module's active master key."""
    return MasterKey.generate()


@pytest.fixture(scope="module")
def record(session: Session, kek: MasterKey) -> bytes:
    """The session sealed under ``kek``."""
    return seal_record(session, kek)


@pytest.fixture(scope="module")
def written_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ServiceKey]:
    """A directory written once by write_keys, and the service key it returned."""
    directory = tmp_path_factory.mktemp("keys")
    return directory, write_keys(directory)


def kek_id(key: bytes) -> str:
    """The spec's kekId, computed independently."""
    return hashlib.sha256(b"sealstream kek id" + key).hexdigest()[:16]


def private_der(key: rsa.RSAPrivateKey) -> bytes:
    """PKCS#8 DER of ``key``."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_der(key: rsa.RSAPublicKey) -> bytes:
    """SPKI DER of ``key``."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def build_record(session: Session, key: bytes, *, aad: bytes, kek: str | None = None) -> bytes:
    """A record built from PROTOCOL.md alone, sealed under ``key`` with the given AAD."""
    inner = msgpack.packb(
        {
            "priv": private_der(session.private_key),
            "pub": public_der(session.public_key),
            "ks": session.ks,
            "created": session.created,
            "expires": session.expires,
        },
        use_bin_type=True,
    )
    nonce = os.urandom(12)
    c = AESGCM(key).encrypt(nonce, inner, aad)
    outer = {"v": 1, "kek": kek or kek_id(key), "n": nonce, "c": c}
    data: bytes = msgpack.packb(outer, use_bin_type=True)
    return data


def flip(data: bytes, bit: int) -> bytes:
    """``data`` with one bit inverted."""
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def assert_same_session(expected: Session, actual: Session) -> None:
    """Two sessions hold the same sid, secrets and lifetime."""
    assert (expected.sid, expected.ks, expected.created, expected.expires) == (
        actual.sid,
        actual.ks,
        actual.created,
        actual.expires,
    )
    assert private_der(expected.private_key) == private_der(actual.private_key)


# -- record round trip and layout --------------------------------------------------


def test_record_round_trips(session: Session, kek: MasterKey, record: bytes) -> None:
    """open_record(seal_record(s)) gives back the same session."""
    assert_same_session(session, open_record(SID, record, MasterKeys(kek)))


def test_record_outer_layout_is_the_spec_map(kek: MasterKey, record: bytes) -> None:
    """The record is a MessagePack map of exactly v=1, kek=kekId, n (12 bytes), c (bytes)."""
    outer = msgpack.unpackb(record, raw=False)
    assert {"v", "kek", "n", "c"} == set(outer)
    assert 1 == outer["v"]
    assert kek_id(kek.key) == outer["kek"]
    assert isinstance(outer["n"], bytes)
    assert 12 == len(outer["n"])
    assert isinstance(outer["c"], bytes)


def test_record_inner_map_opens_independently(
    session: Session, kek: MasterKey, record: bytes
) -> None:
    """``c`` is AES-256-GCM under the KEK, AAD ``sealstream/1 session|sid|kekId``, of the map."""
    outer = msgpack.unpackb(record, raw=False)
    aad = f"sealstream/1 session|{SID}|{kek_id(kek.key)}".encode("ascii")
    inner = msgpack.unpackb(AESGCM(kek.key).decrypt(outer["n"], outer["c"], aad), raw=False)
    assert {"priv", "pub", "ks", "created", "expires"} == set(inner)
    assert private_der(session.private_key) == inner["priv"]
    assert public_der(session.public_key) == inner["pub"]
    assert session.ks == inner["ks"]
    assert (NOW, NOW + 600_000) == (inner["created"], inner["expires"])


def test_record_holds_no_secret_in_the_clear(session: Session, record: bytes) -> None:
    """Neither Ks, the private key, nor the public key appear in the sealed record."""
    assert session.ks not in record
    assert private_der(session.private_key)[-64:] not in record
    assert public_der(session.public_key)[-64:] not in record


def test_record_nonce_is_fresh_each_time(session: Session, kek: MasterKey) -> None:
    """Sealing the same session twice uses two different nonces."""
    one = msgpack.unpackb(seal_record(session, kek), raw=False)
    two = msgpack.unpackb(seal_record(session, kek), raw=False)
    assert one["n"] != two["n"]


def test_record_built_from_the_spec_opens(session: Session, kek: MasterKey) -> None:
    """A record built from PROTOCOL.md alone opens with open_record."""
    aad = f"sealstream/1 session|{SID}|{kek_id(kek.key)}".encode("ascii")
    assert_same_session(
        session, open_record(SID, build_record(session, kek.key, aad=aad), MasterKeys(kek))
    )


# -- kekId -------------------------------------------------------------------------


@settings(max_examples=100)
@given(key=st.binary(min_size=32, max_size=32))
def test_kek_id_is_the_spec_formula(key: bytes) -> None:
    """kekId is the first 16 hex chars of SHA-256(``sealstream kek id`` || KEK)."""
    assert kek_id(key) == MasterKey(key).id


def test_kek_id_known_answer() -> None:
    """kekId of the all-zero KEK, as computed by hand from the formula."""
    expected = hashlib.sha256(b"sealstream kek id" + bytes(32)).hexdigest()[:16]
    assert 16 == len(expected)
    assert expected == MasterKey(bytes(32)).id


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_master_key_must_be_32_bytes(length: int) -> None:
    """A master key of any other length raises ValueError."""
    with pytest.raises(ValueError):
        MasterKey(os.urandom(length))


# -- AAD binding -------------------------------------------------------------------


def test_record_copied_to_another_sid_fails(kek: MasterKey, record: bytes) -> None:
    """A record opened under another sid raises DecryptError (the AAD binds the sid)."""
    with pytest.raises(DecryptError):
        open_record(OTHER_SID, record, MasterKeys(kek))


def test_record_aad_binds_the_kek_id(session: Session, kek: MasterKey) -> None:
    """A record sealed with another kekId in its AAD does not open, though the key is right."""
    other = MasterKey.generate()
    aad = f"sealstream/1 session|{SID}|{other.id}".encode("ascii")
    with pytest.raises(DecryptError):
        open_record(SID, build_record(session, kek.key, aad=aad), MasterKeys(kek, [other]))


def test_record_without_kek_id_in_aad_fails(session: Session, kek: MasterKey) -> None:
    """A record whose AAD lacks the kekId does not open."""
    aad = f"sealstream/1 session|{SID}".encode("ascii")
    with pytest.raises(DecryptError):
        open_record(SID, build_record(session, kek.key, aad=aad), MasterKeys(kek))


def test_record_relabelled_to_another_kek_fails(session: Session, kek: MasterKey) -> None:
    """A record whose ``kek`` field names another KEK of the ring raises DecryptError."""
    other = MasterKey.generate()
    aad = f"sealstream/1 session|{SID}|{kek.id}".encode("ascii")
    relabelled = build_record(session, kek.key, aad=aad, kek=other.id)
    with pytest.raises(DecryptError):
        open_record(SID, relabelled, MasterKeys(kek, [other]))


# -- rotation ----------------------------------------------------------------------


def test_record_under_an_older_kek_opens_after_rotation(
    session: Session, kek: MasterKey, record: bytes
) -> None:
    """After rotation, a record sealed under the old KEK opens with the ring holding it."""
    ring = MasterKeys(MasterKey.generate(), [kek])
    assert_same_session(session, open_record(SID, record, ring))


def test_ring_seals_under_the_active_kek(session: Session, kek: MasterKey) -> None:
    """A record sealed with the ring's active KEK names it and opens under it."""
    ring = MasterKeys(MasterKey.generate(), [kek])
    sealed = seal_record(session, ring.active)
    assert ring.active.id == msgpack.unpackb(sealed, raw=False)["kek"]
    assert_same_session(session, open_record(SID, sealed, ring))


def test_record_under_an_unknown_kek_fails(record: bytes) -> None:
    """A record sealed under a KEK the ring does not hold raises DecryptError."""
    with pytest.raises(DecryptError):
        open_record(SID, record, MasterKeys(MasterKey.generate(), [MasterKey.generate()]))


def test_master_keys_get_by_id(kek: MasterKey) -> None:
    """The ring finds its active and older KEKs by id and nothing else."""
    active = MasterKey.generate()
    ring = MasterKeys(active, [kek])
    assert (active, kek, None) == (ring.get(active.id), ring.get(kek.id), ring.get("0" * 16))


# -- tampering ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_flipping_any_bit_of_the_record_fails(
    kek: MasterKey, record: bytes, data: st.DataObject
) -> None:
    """A record with any one bit flipped raises DecryptError."""
    bit = data.draw(st.integers(0, len(record) * 8 - 1), label="bit")
    with pytest.raises(DecryptError):
        open_record(SID, flip(record, bit), MasterKeys(kek))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_truncated_or_extended_record_fails(
    kek: MasterKey, record: bytes, data: st.DataObject
) -> None:
    """A record cut short, or with bytes appended, raises DecryptError."""
    cut = data.draw(st.integers(0, len(record) - 1), label="cut")
    extra = data.draw(st.binary(min_size=1, max_size=8), label="extra")
    for damaged in (record[:cut], record + extra):
        with pytest.raises(DecryptError):
            open_record(SID, damaged, MasterKeys(kek))


@settings(max_examples=100)
@given(raw=st.binary(max_size=300))
def test_garbage_record_fails(kek: MasterKey, raw: bytes) -> None:
    """Arbitrary bytes as a record raise DecryptError and nothing else."""
    with pytest.raises(DecryptError):
        open_record(SID, raw, MasterKeys(kek))


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"v": True},
        {"n": "not bytes"},
        {"n": b"short"},
        {"c": b"x" * 15},
        {"c": "text"},
        {"kek": 7},
        {"extra": 1},
    ],
    ids=repr,
)
def test_record_with_bad_outer_fields_fails(
    kek: MasterKey, record: bytes, change: dict[str, object]
) -> None:
    """An outer map with a wrong version, nonce, ciphertext, kek or extra field fails."""
    outer = msgpack.unpackb(record, raw=False)
    outer.update(change)
    with pytest.raises(DecryptError):
        open_record(SID, msgpack.packb(outer, use_bin_type=True), MasterKeys(kek))


@pytest.mark.parametrize("missing", ["priv", "pub", "ks", "created", "expires"])
def test_record_with_incomplete_inner_map_fails(
    session: Session, kek: MasterKey, missing: str
) -> None:
    """A correctly sealed record whose inner map lacks a field raises DecryptError."""
    inner = {
        "priv": private_der(session.private_key),
        "pub": public_der(session.public_key),
        "ks": session.ks,
        "created": NOW,
        "expires": NOW + 1,
    }
    del inner[missing]
    nonce = os.urandom(12)
    aad = f"sealstream/1 session|{SID}|{kek.id}".encode("ascii")
    c = AESGCM(kek.key).encrypt(nonce, msgpack.packb(inner, use_bin_type=True), aad)
    raw = msgpack.packb({"v": 1, "kek": kek.id, "n": nonce, "c": c}, use_bin_type=True)
    with pytest.raises(DecryptError):
        open_record(SID, raw, MasterKeys(kek))


# -- lifetimes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (-5, 60),
        (0, 60),
        (59, 60),
        (60, 60),
        (61, 61),
        (3600, 3600),
        (86399, 86399),
        (86400, 86400),
        (86401, 86400),
        (10**9, 86400),
    ],
)
def test_clamp_ttl_bounds(requested: int, expected: int) -> None:
    """clamp_ttl keeps a lifetime within 60..86400 seconds."""
    assert expected == clamp_ttl(requested)


@settings(max_examples=100)
@given(ttl=st.integers(-(10**12), 10**12))
def test_clamp_ttl_is_within_bounds_and_identity_inside(ttl: int) -> None:
    """clamp_ttl's result is always in 60..86400 and equals the input inside it."""
    actual = clamp_ttl(ttl)
    assert MIN_TTL_S <= actual <= MAX_TTL_S
    assert (MIN_TTL_S <= ttl <= MAX_TTL_S) is (ttl == actual)


def test_session_expiry_is_clamped_and_read_from_the_record(session: Session) -> None:
    """A session's expiry is created + clamped ttl, and expired() is exact at the boundary."""
    assert NOW + 600_000 == session.expires
    assert (False, True, True) == (
        session.expired(session.expires - 1),
        session.expired(session.expires),
        session.expired(session.expires + 1),
    )


@pytest.mark.parametrize("length", [0, 16, 33])
def test_new_session_needs_a_32_byte_ks(length: int) -> None:
    """new_session refuses a Ks that is not 32 bytes with ValueError."""
    with pytest.raises(ValueError):
        new_session(SID, ks=os.urandom(length), now_ms=NOW)


# -- reprs -------------------------------------------------------------------------


def test_master_key_repr_never_shows_the_key() -> None:
    """repr of a MasterKey and of a ring shows no form of the key."""
    key = MasterKey.generate()
    for text in (repr(key), str(key), repr(MasterKeys(key))):
        for form in (repr(key.key), key.key.hex(), key.to_base64(), str(key.key)):
            assert form not in text


def test_session_repr_never_shows_secrets(session: Session) -> None:
    """repr of a Session shows neither Ks nor the private key."""
    text = repr(session)
    assert repr(session.ks) not in text
    assert session.ks.hex() not in text
    assert "RSAPrivateKey" not in text


# -- key files ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["service.pem", "master.key"])
def test_write_keys_writes_private_files_with_mode_0600(
    written_keys: tuple[Path, ServiceKey], name: str
) -> None:
    """service.pem and master.key are written readable by the owner only (0600)."""
    directory, _ = written_keys
    assert 0o600 == stat.S_IMODE((directory / name).stat().st_mode)


def test_write_keys_writes_loadable_keys(written_keys: tuple[Path, ServiceKey]) -> None:
    """The written files load back as the returned service key and one master key."""
    directory, service = written_keys
    assert {"service.pem", "service.pub.pem", "master.key"} == {p.name for p in directory.iterdir()}
    assert service.kid == load_service_key(directory / "service.pem").kid
    assert service.public_pem == (directory / "service.pub.pem").read_text("ascii")
    ring = load_master_key_file(directory / "master.key")
    assert 32 == len(ring.active.key)


def test_write_keys_refuses_to_overwrite(written_keys: tuple[Path, ServiceKey]) -> None:
    """write_keys into a directory that has the files raises ConfigError, files unchanged."""
    directory, _ = written_keys
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(ConfigError):
        write_keys(directory)
    assert before == {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.mark.parametrize("name", ["service.pem", "service.pub.pem", "master.key"])
def test_write_keys_refuses_when_any_one_file_exists(tmp_path: Path, name: str) -> None:
    """One existing key file is enough to refuse; it is left as it was and nothing is added."""
    (tmp_path / name).write_bytes(b"keep me")
    with pytest.raises(ConfigError):
        write_keys(tmp_path)
    assert [name] == [p.name for p in tmp_path.iterdir()]
    assert b"keep me" == (tmp_path / name).read_bytes()


def test_load_service_key_missing_file_names_the_setting(tmp_path: Path) -> None:
    """A missing service key file raises ConfigError naming the setting."""
    with pytest.raises(ConfigError, match="SEALSTREAM_SERVICE_KEY_FILE"):
        load_service_key(tmp_path / "absent.pem")
    with pytest.raises(ConfigError, match="--service-key"):
        load_service_key(tmp_path / "absent.pem", setting="--service-key")


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", bytes(64)],
    ids=["empty", "text", "bad-pem", "binary"],
)
def test_load_service_key_garbage_file_names_the_setting(tmp_path: Path, content: bytes) -> None:
    """A service key file that is not a PEM private key raises ConfigError naming the setting."""
    path = tmp_path / "service.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="SEALSTREAM_SERVICE_KEY_FILE"):
        load_service_key(path)


def test_load_service_key_refuses_non_rsa_and_small_keys(tmp_path: Path) -> None:
    """An EC key or an RSA key under 2048 bits raises ConfigError naming the setting."""
    for name, key in (
        ("ec.pem", ec.generate_private_key(ec.SECP256R1())),
        ("rsa1024.pem", rsa.generate_private_key(public_exponent=65537, key_size=1024)),
    ):
        path = tmp_path / name
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        with pytest.raises(ConfigError, match="SEALSTREAM_SERVICE_KEY_FILE"):
            load_service_key(path)


def test_load_master_key_file_missing_file_names_the_setting(tmp_path: Path) -> None:
    """A missing master key file raises ConfigError naming the setting."""
    with pytest.raises(ConfigError, match="SEALSTREAM_MASTER_KEY_FILE"):
        load_master_key_file(tmp_path / "absent.key")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n\n",
        b"not base64 at all!",
        base64.b64encode(bytes(16)) + b"\n",
        base64.b64encode(bytes(31)) + b"\n",
        base64.b64encode(bytes(33)) + b"\n",
        base64.b64encode(bytes(32)) + b"\n" + base64.b64encode(bytes(16)) + b"\n",
        "k\u00e9y".encode(),
        b"\xff\xfe",
    ],
    ids=[
        "empty",
        "blank",
        "not-base64",
        "16-bytes",
        "31-bytes",
        "33-bytes",
        "second-key-short",
        "non-ascii",
        "binary",
    ],
)
def test_load_master_key_file_garbage_names_the_setting(tmp_path: Path, content: bytes) -> None:
    """An empty, non-base64, non-ASCII or wrong-length master key file raises ConfigError."""
    path = tmp_path / "master.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="SEALSTREAM_MASTER_KEY_FILE") as err:
        load_master_key_file(path)
    assert base64.b64encode(bytes(32)).decode() not in str(err.value)


def test_load_master_key_file_reads_active_then_older(tmp_path: Path) -> None:
    """Several base64 lines: the first is active, the rest stay readable."""
    active, older = MasterKey.generate(), MasterKey.generate()
    path = tmp_path / "master.key"
    path.write_text(f"{active.to_base64()}\n{older.to_base64()}\n", "ascii")
    ring = load_master_key_file(path)
    assert (active.key, older) == (ring.active.key, ring.get(older.id))


def test_master_key_error_does_not_echo_the_key_text() -> None:
    """A wrong-length key's ConfigError names the setting and does not quote the text."""
    text = base64.b64encode(b"s3cret-material-16").decode()
    with pytest.raises(ConfigError, match="SEALSTREAM_MASTER_KEY") as err:
        parse_master_keys(text, setting="SEALSTREAM_MASTER_KEY")
    assert text not in str(err.value)
