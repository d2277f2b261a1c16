"""The handshake's two halves (worker.handshake), without Redis: client hello, worker
accept and answer, client finish; tampering and wrong keys; the protocol document's
worked example."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from tests.test_protocol_doc import block, hex_block, inputs
from worker import codec, envelopes
from worker.crypto import request_aad, x25519_public
from worker.errors import BadPayload, DecryptError, Malformed
from worker.handshake import Accepted, Hello, accept, answer, finish, hello, hello_plaintext
from worker.keys import ServiceKey
from worker.protocol import ALG_RSA, HANDSHAKE_TYPE
from worker.testing import ThrowawayKeys
from worker.wire import Field

NOW = 1_700_000_000_000
MAX_TTL = 86_400


def _hello(keys: ThrowawayKeys, field: Field = "e", ttl_s: int | None = 600) -> Hello:
    return hello(keys.service.public_key, field=field, now_ms=NOW, ttl_s=ttl_s)


def _opened(keys: ThrowawayKeys, sent: Hello) -> envelopes.Opened:
    """The hello opened by the worker's service key."""
    return envelopes.open_request(sent.request, private_key=keys.service.private_key)


def _accept_plaintext(keys: ThrowawayKeys, plaintext: bytes, field: Field = "e") -> Accepted:
    """accept() of a hello carrying ``plaintext`` as it is."""
    sent = _hello(keys, field)
    opened = dataclasses.replace(_opened(keys, sent), plaintext=plaintext)
    return accept(sent.request, opened, max_ttl_s=MAX_TTL)


def _worker(keys: ThrowawayKeys, sent: Hello) -> tuple[Accepted, dict[str, object]]:
    """The worker's halves for ``sent``: what it accepted, and its answer decoded as the
    client's reply reader does."""
    accepted = accept(sent.request, _opened(keys, sent), max_ttl_s=MAX_TTL)
    done = answer(
        sent.request, accepted, private_key=keys.service.private_key, now_ms=NOW, max_ttl_s=MAX_TTL
    )
    value = codec.loads(done.plaintext, sent.request.field)
    assert isinstance(value, dict)
    return accepted, value


def _reply_value(keys: ThrowawayKeys, sent: Hello) -> dict[str, object]:
    """What the worker answers to ``sent``."""
    return _worker(keys, sent)[1]


# -- both halves -----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["e", "j"])
def test_both_sides_derive_the_same_session_key(keys: ThrowawayKeys, field: Field) -> None:
    """The client's finished grant holds the Ks, public key and expiry the worker's
    session record holds, in both encodings."""
    sent = _hello(keys, field)
    accepted = accept(sent.request, _opened(keys, sent), max_ttl_s=MAX_TTL)
    done = answer(
        sent.request, accepted, private_key=keys.service.private_key, now_ms=NOW, max_ttl_s=MAX_TTL
    )
    grant = finish(sent, codec.loads(done.plaintext, field))
    assert (sent.request.sid, done.session.ks, done.session.public_pem, NOW + 600_000) == (
        grant.sid,
        grant.session_key,
        grant.public_key_pem,
        grant.expires_at,
    )


def test_hello_is_an_rsa_handshake_pinned_to_the_service_key(keys: ThrowawayKeys) -> None:
    """A hello is an RSA-mode request of the handshake type, with the service kid and ts."""
    request = _hello(keys).request
    assert (ALG_RSA, HANDSHAKE_TYPE, keys.service.kid, NOW) == (
        request.alg,
        request.type,
        request.kid,
        request.ts,
    )


def test_hello_replies_open_under_kb(keys: ThrowawayKeys) -> None:
    """The worker's reply key for a hello is the client's Kb."""
    sent = _hello(keys)
    assert sent.outgoing.reply_key == _opened(keys, sent).reply_key


def test_hello_without_ttl_asks_for_none(keys: ThrowawayKeys) -> None:
    """ttl_s=None leaves ttl out of the plaintext: the worker's default (3600 s) applies."""
    sent = _hello(keys, ttl_s=None)
    assert 3600 == accept(sent.request, _opened(keys, sent), max_ttl_s=MAX_TTL).ttl_s


def test_answer_creates_the_session_now_for_the_clamped_ttl(keys: ThrowawayKeys) -> None:
    """The session is created at now_ms and lives the asked ttl clamped to the maximum."""
    sent = _hello(keys, ttl_s=10 * MAX_TTL)
    accepted = accept(sent.request, _opened(keys, sent), max_ttl_s=MAX_TTL)
    done = answer(
        sent.request, accepted, private_key=keys.service.private_key, now_ms=NOW, max_ttl_s=MAX_TTL
    )
    assert (NOW, NOW + MAX_TTL * 1000) == (done.session.created, done.session.expires)


# -- the worker refuses hellos ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"ttl": 60}, "the handshake needs clientEphemeral"),
        ({"clientEphemeral": bytes(32), "extra": 1}, "unknown handshake fields"),
        ({"clientEphemeral": "not bytes"}, "clientEphemeral is not binary"),
        ({"clientEphemeral": bytes(31)}, "clientEphemeral must be 32 bytes"),
        ({"clientEphemeral": bytes(32), "ttl": True}, "ttl must be an integer number of seconds"),
        ({"clientEphemeral": bytes(32), "ttl": 60.0}, "ttl must be an integer number of seconds"),
    ],
)
def test_accept_refuses_a_payload_not_the_protocols(
    keys: ThrowawayKeys, body: dict[str, object], message: str
) -> None:
    """Fields missing, unknown or of the wrong type are BadPayload, saying which."""
    with pytest.raises(BadPayload) as caught:
        _accept_plaintext(keys, codec.dumps(body, "e"))
    assert message == caught.value.message


def test_accept_refuses_a_low_order_client_ephemeral(keys: ThrowawayKeys) -> None:
    """An Ec X25519 refuses (all zeros: low order) is BadPayload, not a crash."""
    with pytest.raises(BadPayload) as caught:
        _accept_plaintext(keys, hello_plaintext(bytes(32), "e", ttl_s=60))
    assert "invalid handshake payload" == caught.value.message


def test_accept_refuses_a_plaintext_that_is_not_strict(keys: ThrowawayKeys) -> None:
    """A plaintext that does not decode strictly is BadPayload."""
    with pytest.raises(BadPayload):
        _accept_plaintext(keys, b'{"clientEphemeral": NaN}', "j")


def test_tampered_hello_does_not_open(keys: ThrowawayKeys) -> None:
    """A hello whose ciphertext was changed fails to open (one opaque error)."""
    request = _hello(keys).request
    data = bytes([request.encrypted_data[0] ^ 1]) + request.encrypted_data[1:]
    with pytest.raises(DecryptError):
        envelopes.open_request(
            dataclasses.replace(request, encrypted_data=data),
            private_key=keys.service.private_key,
        )


def test_hello_to_another_service_key_does_not_open() -> None:
    """A hello sealed for one service key fails to open under another."""
    ours, theirs = ServiceKey.generate(), ServiceKey.generate()
    sent = hello(theirs.public_key, field="e", now_ms=NOW)
    with pytest.raises(DecryptError):
        envelopes.open_request(sent.request, private_key=ours.private_key)


# -- the client refuses answers --------------------------------------------------------


def test_finish_refuses_an_answer_for_another_session(keys: ThrowawayKeys) -> None:
    """An answer whose sessionId is not the hello's sid is Malformed."""
    sent = _hello(keys)
    value = {**_reply_value(keys, sent), "sessionId": "0" * 32}
    with pytest.raises(Malformed):
        finish(sent, value)


@pytest.mark.parametrize("missing", ["serverEphemeral", "publicKey", "expiresAt"])
def test_finish_refuses_an_answer_missing_a_field(keys: ThrowawayKeys, missing: str) -> None:
    """An answer without one of its fields is Malformed."""
    sent = _hello(keys)
    value = _reply_value(keys, sent)
    del value[missing]
    with pytest.raises(Malformed):
        finish(sent, value)


@pytest.mark.parametrize("ew", [bytes(31), bytes(32)])
def test_finish_refuses_a_bad_server_ephemeral(keys: ThrowawayKeys, ew: bytes) -> None:
    """An Ew that is not 32 bytes, or one X25519 refuses (low order), is Malformed."""
    sent = _hello(keys)
    value = {**_reply_value(keys, sent), "serverEphemeral": ew}
    with pytest.raises(Malformed):
        finish(sent, value)


def test_answer_to_another_hello_gives_another_key(keys: ThrowawayKeys) -> None:
    """Finishing with another hello's secrets (a wrong ec and Kb) derives a different Ks."""
    sent, other = _hello(keys), _hello(keys)
    accepted, value = _worker(keys, sent)
    assert accepted.ks == finish(sent, value).session_key
    outgoing = dataclasses.replace(other.outgoing, request=sent.request)
    wrong = dataclasses.replace(other, outgoing=outgoing)
    assert accepted.ks != finish(wrong, value).session_key


# -- the worked example of docs/protocol.md ----------------------------------------------


def _example_hello(keys: ThrowawayKeys) -> Hello:
    i = inputs()
    return hello(
        keys.service.public_key,
        field="j",
        now_ms=int(i["handshake_ts"]),
        ttl_s=3600,
        sid=i["sid"],
        mid=i["handshake_mid"],
        kb=bytes.fromhex(i["Kb"]),
        ephemeral=x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(i["ec_private"])),
    )


def test_example_hello_plaintext_and_aad(keys: ThrowawayKeys) -> None:
    """The hello of the worked example's inputs has the documented plaintext and AAD."""
    sent = _example_hello(keys)
    opened = _opened(keys, sent)
    r = sent.request
    assert (block("handshake-plaintext"), block("handshake-request-aad")) == (
        opened.plaintext.decode("utf-8"),
        request_aad(r.alg, r.sid, r.mid, r.ts, r.type).decode("ascii"),
    )


def test_example_session_key(keys: ThrowawayKeys) -> None:
    """The worker's accept and the client's finish both give the documented Ew and Ks."""
    sent = _example_hello(keys)
    ew_private = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(inputs()["ew_private"]))
    accepted = accept(sent.request, _opened(keys, sent), max_ttl_s=MAX_TTL, ephemeral=ew_private)
    done = answer(
        sent.request, accepted, private_key=keys.service.private_key, now_ms=NOW, max_ttl_s=MAX_TTL
    )
    grant = finish(sent, codec.loads(done.plaintext, "j"))
    assert (hex_block("handshake-ew"), hex_block("handshake-ks"), hex_block("handshake-ks")) == (
        x25519_public(ew_private),
        accepted.ks,
        grant.session_key,
    )
