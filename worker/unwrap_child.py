"""The child process of :mod:`worker.unwrapping`: RSA unwraps, frame by frame.

Run by path with ``python -I`` (:data:`worker.unwrapping.CHILD_COMMAND`), it imports
only the standard library, cryptography and msgpack (~20 MB, ~50 ms to start), not
the ``worker`` package: nothing here may import from it. The worker imports the frame
functions from here.

A frame is a 4-byte big-endian length and a MessagePack body. A request is
``[[der, ...], [[der index, wrapped], ...]]`` (each session private key, PKCS#8 DER,
once); the answer is ``[key, ...]``, a 32-byte key per item. An item that fails to
unwrap answers a random key, as :func:`worker.crypto.unwrap_key` does, so the GCM
check fails on the same path as a wrong tag (no padding oracle). Once started, the
child writes an empty answer (it is ready). It ignores SIGINT and SIGTERM (its worker
may be draining) and exits when its stdin closes: when the worker stops or dies.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import BinaryIO

import msgpack
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_private_key

#: private keys a child keeps loaded (a 2048-bit key ~2 KB)
CHILD_KEYS = 1024
#: the largest frame either side accepts (a chunk of 16 carries ~40 KB)
MAX_FRAME = 16 * 1024 * 1024
#: the size of an unwrapped key (the protocol's AES-256 key)
KEY_SIZE = 32
#: RSA-OAEP with SHA-256 and MGF1-SHA-256, no label (the protocol's wrap)
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)

#: one unwrap: the session's private key (PKCS#8 DER) and the wrapped key
Item = tuple[bytes, bytes]


# -- the frames ------------------------------------------------------------------------


def encode_request(items: Sequence[Item]) -> bytes:
    """A request frame for ``items`` (each distinct key's DER sent once)."""
    ders: dict[bytes, int] = {}
    refs = [[ders.setdefault(der, len(ders)), wrapped] for der, wrapped in items]
    return _frame([list(ders), refs])


def decode_request(body: bytes) -> list[Item]:
    """``(der, wrapped)`` pairs of a request body; TypeError when it is not one."""
    value = msgpack.unpackb(body, raw=False, strict_map_key=True)
    if not (isinstance(value, list) and len(value) == 2):
        raise TypeError("not an unwrap request")
    ders, refs = value
    if not (isinstance(ders, list) and isinstance(refs, list)):
        raise TypeError("not an unwrap request")
    out: list[Item] = []
    for ref in refs:
        if not (isinstance(ref, list) and len(ref) == 2):
            raise TypeError("not an unwrap request")
        index, wrapped = ref
        if not (isinstance(index, int) and 0 <= index < len(ders)):
            raise TypeError("not an unwrap request")
        der = ders[index]
        if not (isinstance(der, bytes) and isinstance(wrapped, bytes)):
            raise TypeError("not an unwrap request")
        out.append((der, wrapped))
    return out


def encode_answer(keys: Sequence[bytes]) -> bytes:
    """An answer frame: the unwrapped keys, in order."""
    return _frame(list(keys))


def decode_answer(body: bytes, count: int) -> list[bytes]:
    """The ``count`` keys of an answer body; TypeError when it is not that."""
    value = msgpack.unpackb(body, raw=False)
    if not (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(k, bytes) and len(k) == KEY_SIZE for k in value)
    ):
        raise TypeError("not an unwrap answer")
    return value


def _frame(value: object) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


# -- the child -------------------------------------------------------------------------


class Unwrapper:
    """The child's work: unwraps with its loaded keys (the last :data:`CHILD_KEYS`)."""

    def __init__(self, size: int = CHILD_KEYS) -> None:
        self._size = size
        self._keys: OrderedDict[bytes, rsa.RSAPrivateKey] = OrderedDict()

    def unwrap(self, items: Sequence[Item]) -> list[bytes]:
        """A 32-byte key per item: unwrapped, or random when it fails to unwrap."""
        return [unwrap(self._key(der), wrapped) for der, wrapped in items]

    def _key(self, der: bytes) -> rsa.RSAPrivateKey:
        key = self._keys.get(der)
        if key is not None:
            self._keys.move_to_end(der)
            return key
        # Loaded without validation, as the worker loads it: the DER comes from a
        # session record authenticated under a master key (or a key we generated).
        loaded = load_der_private_key(der, password=None, unsafe_skip_rsa_key_validation=True)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise TypeError("not an RSA private key")
        self._keys[der] = loaded
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)
        return loaded


def unwrap(key: rsa.RSAPrivateKey, wrapped: bytes) -> bytes:
    """The key wrapped in ``wrapped``, or a random one when it fails to unwrap (the
    substitute is drawn first, on both paths)."""
    substitute = os.urandom(KEY_SIZE)
    try:
        unwrapped = key.decrypt(wrapped, OAEP)
    except ValueError:
        return substitute
    return unwrapped if len(unwrapped) == KEY_SIZE else substitute


def serve(stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Say it is ready, then answer request frames from ``stdin`` until it closes."""
    unwrapper = Unwrapper()
    stdout.write(encode_answer([]))
    stdout.flush()
    while True:
        head = _read_exactly(stdin, 4)
        if head is None:
            return 0
        size = int.from_bytes(head, "big")
        body = _read_exactly(stdin, size) if size <= MAX_FRAME else None
        if body is None:
            return 1
        stdout.write(encode_answer(unwrapper.unwrap(decode_request(body))))
        stdout.flush()


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    """``size`` bytes, or None at the end of the stream."""
    parts: list[bytes] = []
    left = size
    while left:
        part = stream.read(left)
        if not part:
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def main() -> int:
    """The child's entry point."""
    # Its worker may be draining after a Ctrl-C or a SIGTERM sent to the whole group:
    # the child exits when the worker closes its stdin (or dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        return serve(sys.stdin.buffer, sys.stdout.buffer)
    except Exception as exc:
        # The type only: a message could quote its input.
        sys.stderr.write(f"sealstream unwrap process failed: {type(exc).__name__}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
