"""RSA unwraps in child processes (worker.unwrapping, ``SEALSTREAM_UNWRAP_PROCESSES``)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

import worker.unwrapping
from tests.helpers import Raw, Rig, open_ok, serving, wait_until
from worker import App, crypto
from worker.handshake import SessionGrant
from worker.processor import Processor
from worker.protocol import ALG_RSA, ALG_SK
from worker.runtime import Worker
from worker.sessions import new_session, open_record, seal_record
from worker.settings import Settings
from worker.testing import ThrowawayKeys
from worker.unwrap_child import (
    Unwrapper,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
)
from worker.unwrapping import CHILD_COMMAND

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair() -> tuple[rsa.RSAPrivateKey, bytes]:
    """A 2048-bit key and its PKCS#8 DER."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key, der


def wrap(key: rsa.RSAPrivateKey, secret: bytes) -> bytes:
    return key.public_key().encrypt(secret, crypto._OAEP)


def processor(worker: Worker) -> Processor:
    assert worker.processor is not None
    return worker.processor


# -- the frames and the child's work ---------------------------------------------------


@given(st.lists(st.tuples(st.sampled_from([b"k1", b"k2", b"k3"]), st.binary(max_size=300))))
def test_request_frame_round_trips(items: list[tuple[bytes, bytes]]) -> None:
    """A request frame gives back its items in order, each key's DER once on the wire."""
    frame = encode_request(items)
    assert len(frame) - 4 == int.from_bytes(frame[:4], "big")
    assert items == decode_request(frame[4:])
    assert frame.count(b"k1") <= 1


@given(st.lists(st.binary(min_size=32, max_size=32), max_size=20))
def test_answer_frame_round_trips(keys: list[bytes]) -> None:
    """An answer frame gives back its 32-byte keys in order."""
    assert keys == decode_answer(encode_answer(keys)[4:], len(keys))


@pytest.mark.parametrize(
    "body",
    [
        [],
        [[b"d"]],
        [[b"d"], [[1, b"w"]]],
        [[b"d"], [[-1, b"w"]]],
        [["d"], [[0, b"w"]]],
        [[b"d"], [[0, "w"]]],
        [[b"d"], [[0]]],
        {"a": 1},
    ],
)
def test_a_malformed_request_is_refused(body: object) -> None:
    """A body that is not ``[[der...], [[index, wrapped]...]]`` is refused, not guessed."""
    with pytest.raises(TypeError):
        decode_request(encode_answer(body)[4:])  # type: ignore[arg-type]


def test_an_answer_of_the_wrong_count_or_size_is_refused() -> None:
    """An answer with a key missing or not 32 bytes is refused."""
    with pytest.raises(TypeError):
        decode_answer(encode_answer([b"k" * 32])[4:], 2)
    with pytest.raises(TypeError):
        decode_answer(encode_answer([b"k" * 31])[4:], 1)


def test_unwrapper_unwraps_and_substitutes(pair: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    """Each item gives its key; one that fails to unwrap gives a fresh random key, as
    ``crypto.unwrap_key`` does in a thread (no padding oracle)."""
    key, der = pair
    secret = os.urandom(32)
    wrapped = wrap(key, secret)
    bad = bytes([wrapped[0] ^ 1]) + wrapped[1:]
    got = Unwrapper().unwrap([(der, wrapped), (der, bad), (der, bad)])
    assert secret == got[0]
    assert 32 == len(got[1]) == len(got[2])
    assert got[1] != secret and got[1] != got[2]


def test_unwrapper_keeps_a_bounded_set_of_keys(pair: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    """Past its size, the least recently used key is dropped, and loaded again when
    it comes back."""
    key, der = pair
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    other_der = other.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    unwrapper = Unwrapper(size=1)
    secret = os.urandom(32)
    assert [secret] == unwrapper.unwrap([(der, wrap(key, secret))])
    assert [secret] == unwrapper.unwrap([(other_der, wrap(other, secret))])
    assert [other_der] == list(unwrapper._keys)
    assert [secret] == unwrapper.unwrap([(der, wrap(key, secret))])


def test_child_process_answers_ignores_signals_and_exits_at_eof(
    pair: tuple[rsa.RSAPrivateKey, bytes],
) -> None:
    """The child answers frame after frame, lives through SIGINT and SIGTERM (its worker
    may be draining), and exits 0 when its stdin closes."""
    key, der = pair
    child = subprocess.Popen(CHILD_COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert encode_answer([]) == child.stdout.read(5)  # ready
        for sig in (None, signal.SIGINT, signal.SIGTERM):
            secrets = [os.urandom(32) for _ in range(3)]
            child.stdin.write(encode_request([(der, wrap(key, s)) for s in secrets]))
            child.stdin.flush()
            size = int.from_bytes(child.stdout.read(4), "big")
            assert secrets == decode_answer(child.stdout.read(size), 3)
            if sig is not None:
                child.send_signal(sig)
        child.stdin.close()
        assert 0 == child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def test_a_session_opened_from_its_record_keeps_the_key_der(keys: ThrowawayKeys) -> None:
    """The DER a child loads is the record's: the same private key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    session = new_session("a" * 32, ks=os.urandom(32), now_ms=1, private_key=key)
    opened = open_record(session.sid, seal_record(session, keys.master.active), keys.master)
    assert opened.private_der is not None
    assert session.private_key_der() == opened.private_der == opened.private_key_der()


# -- in a worker -----------------------------------------------------------------------


def counting_app(calls: Counter[str]) -> App:
    """``echo``, counting its calls."""
    app = App()

    @app.handler("echo")
    async def echo(payload: Any) -> Any:
        calls["echo"] += 1
        return payload

    return app


def _serving(
    calls: Counter[str],
    settings: Settings,
    keys: ThrowawayKeys,
    redis: aioredis.Redis,
    processes: int,
) -> contextlib.AbstractAsyncContextManager[Rig]:
    """A worker with the counting ``echo`` and ``processes`` unwrap processes."""
    return serving(counting_app(calls), calls, settings, keys, redis, unwrap_processes=processes)


async def _answered(raw: Raw, grant: SessionGrant, alg: str, n: int) -> None:
    outs = [raw.seal(grant, {"i": i}, alg=alg) for i in range(n)]
    for out in outs:
        await raw.send(out.request)
    for i, out in enumerate(outs):
        reply = await raw.reply(out.request.sid, out.request.mid)
        assert {"i": i} == open_ok(reply, out)


async def test_rsa_requests_are_unwrapped_in_the_children(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Once the first RSA request has called them up, the children unwrap every chunk,
    and the gauge counts them."""
    calls: Counter[str] = Counter()
    async with _serving(calls, settings, keys, redis, 2) as rig:
        pool = processor(rig.worker).unwraps
        grant = await rig.raw.grant()
        await _answered(rig.raw, grant, ALG_RSA, 1)  # answered by a thread: none up yet
        await wait_until(lambda: pool.live == 2)
        before = pool.calls
        await _answered(rig.raw, grant, ALG_RSA, 40)
        assert pool.calls >= before + 3  # 40 requests, chunks of at most 16
        assert 2 == processor(rig.worker).metrics.unwrap_processes._value.get()
        assert 41 == calls["echo"]


async def test_a_tampered_key_fails_through_the_children(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A request whose wrapped key was changed is refused ``auth_failed`` (a notice and
    a dead letter) when a child unwraps it, as in a thread, and runs no handler."""
    calls: Counter[str] = Counter()
    async with _serving(calls, settings, keys, redis, 1) as rig:
        pool = processor(rig.worker).unwraps
        grant = await rig.raw.grant()
        await _answered(rig.raw, grant, ALG_RSA, 1)
        await wait_until(lambda: pool.live == 1)
        out = rig.raw.seal(grant, {"i": 0}, alg=ALG_RSA)
        wrapped = out.request.encrypted_aes_key
        assert wrapped is not None
        bad = dataclasses.replace(
            out.request, encrypted_aes_key=bytes([wrapped[0] ^ 1]) + wrapped[1:]
        )
        before = pool.calls
        entry_id = await rig.raw.send(bad)
        reply = await rig.raw.reply(bad.sid, bad.mid)
        assert "rejected" == reply.status
        assert b"auth_failed" == (await rig.raw.letter_for(entry_id))["reason"]
        assert pool.calls == before + 1
        assert 1 == calls["echo"]


async def test_session_key_requests_start_no_child(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """A worker that sees only session-key requests starts no unwrap process."""
    calls: Counter[str] = Counter()
    async with _serving(calls, settings, keys, redis, 2) as rig:
        await _answered(rig.raw, await rig.raw.grant(), ALG_SK, 20)
        assert 0 == processor(rig.worker).unwraps.started


async def test_without_unwrap_processes_threads_unwrap(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """``SEALSTREAM_UNWRAP_PROCESSES=0``: RSA requests are unwrapped in threads."""
    calls: Counter[str] = Counter()
    async with _serving(calls, settings, keys, redis, 0) as rig:
        await _answered(rig.raw, await rig.raw.grant(), ALG_RSA, 20)
        assert 0 == processor(rig.worker).unwraps.started


async def test_a_child_that_dies_is_replaced_and_nothing_is_lost(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Killing a child loses no request (its chunk goes to threads) and the worker starts
    another; when the worker stops, its children are gone."""
    calls: Counter[str] = Counter()
    async with _serving(calls, settings, keys, redis, 2) as rig:
        pool = processor(rig.worker).unwraps
        grant = await rig.raw.grant()
        await _answered(rig.raw, grant, ALG_RSA, 1)
        await wait_until(lambda: pool.live == 2)
        first = {c.process.pid for c in pool._children}
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        await _answered(rig.raw, grant, ALG_RSA, 40)
        await wait_until(lambda: pool.live == 2 and pool.started == 4)
        second = {c.process.pid for c in pool._children}
        assert not first & second
        await _answered(rig.raw, grant, ALG_RSA, 20)
        assert 61 == calls["echo"]
    for pid in first | second:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_child_imports_nothing_of_the_package() -> None:
    """The child runs by path without the ``worker`` package (small and quick to start):
    its module imports only the standard library, cryptography and msgpack."""
    import ast

    import worker.unwrap_child

    tree = ast.parse(Path(worker.unwrap_child.__file__).read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        for name in (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__", "cryptography", "msgpack"}


async def test_children_that_fail_to_start_leave_the_unwraps_to_threads(
    settings: Settings,
    keys: ThrowawayKeys,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child that exits before it is ready is logged and tried again later; the
    requests are unwrapped in threads meanwhile, none lost."""
    monkeypatch.setattr(worker.unwrapping, "CHILD_COMMAND", (sys.executable, "-c", "pass"))
    calls: Counter[str] = Counter()
    with capture_logs() as logs:
        async with _serving(calls, settings, keys, redis, 2) as rig:
            await _answered(rig.raw, await rig.raw.grant(), ALG_RSA, 20)
            await wait_until(
                lambda: any(e["event"] == "unwrap_process_failed_to_start" for e in logs)
            )
            pool = processor(rig.worker).unwraps
            assert (0, 0, 0) == (pool.started, pool.live, pool.calls)
    assert 20 == calls["echo"]
