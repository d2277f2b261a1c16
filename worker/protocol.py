"""The protocol's constants and its two helpers, identifiers and the clock.

Everything that speaks the wire protocol (docs/protocol.md) takes its version,
algorithm names, the handshake's type and the sizes of keys, ivs and tags from
here, and draws ``sid``/``mid`` values and timestamps with :func:`new_id` and
:func:`now_ms`. Pure: no imports from the rest of the package.
"""

from __future__ import annotations

import os
import time
from typing import Final

#: The envelope version every entry carries as ``v``.
VERSION: Final = 1

#: Per-request RSA-OAEP-wrapped AES key (a handshake always uses it).
ALG_RSA: Final = "RSA-OAEP-256+A256GCM"
#: Session-key mode: per-message keys derived from the session key by HKDF.
ALG_SK: Final = "SK+A256GCM"
ALGORITHMS: Final = frozenset({ALG_RSA, ALG_SK})

#: The ``type`` of a handshake request.
HANDSHAKE_TYPE: Final = "sealstream.handshake"

#: AES-256 keys (request keys, ``Kb``, ``Ks``, KEKs), bytes.
KEY_SIZE: Final = 32
#: AES-GCM ivs (nonces), bytes.
IV_SIZE: Final = 12
#: AES-GCM authentication tags, bytes.
TAG_SIZE: Final = 16
#: X25519 public values (``Ec``, ``Ew``), bytes.
X25519_SIZE: Final = 32
#: Random bytes in a ``sid``/``mid`` (written as twice as many hex characters).
ID_BYTES: Final = 16


def new_id() -> str:
    """A fresh ``sid``/``mid``: 16 random bytes as 32 lowercase hex characters."""
    return os.urandom(ID_BYTES).hex()


def now_ms() -> int:
    """Milliseconds since the Unix epoch (the protocol's ``ts`` and expiry times)."""
    return time.time_ns() // 1_000_000
