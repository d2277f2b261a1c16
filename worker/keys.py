"""Key material held by workers: master keys (KEKs) and service key pairs.

A KEK seals session records at rest; its id is the first 16 hex chars of
SHA-256(``sealstream kek id`` || KEK). A :class:`MasterKeys` ring seals under the
active KEK and opens under any it holds, so old KEKs stay readable during rotation.
Service keys are RSA pairs that clients pin by ``kid``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from worker.crypto import kid_of, modulus_bytes, spki_pem
from worker.errors import ConfigError
from worker.protocol import KEY_SIZE


@dataclass(frozen=True, slots=True)
class MasterKey:
    """A 32-byte key-encryption key. Its ``repr`` never shows the key."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_SIZE:
            raise ValueError("a master key is 32 bytes")

    @property
    def id(self) -> str:
        """First 16 hex chars of SHA-256(``sealstream kek id`` || KEK)."""
        return hashlib.sha256(b"sealstream kek id" + self.key).hexdigest()[:16]

    @classmethod
    def generate(cls) -> MasterKey:
        """A fresh random master key."""
        return cls(os.urandom(KEY_SIZE))

    @classmethod
    def from_base64(cls, text: str, *, setting: str = "master key") -> MasterKey:
        """Parse base64 of exactly 32 bytes; :class:`ConfigError` naming ``setting``."""
        try:
            raw = base64.b64decode(text.strip().encode("ascii"), validate=True)
            return cls(raw)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise ConfigError(f"{setting}: expected base64 of exactly 32 bytes") from None

    def to_base64(self) -> str:
        """The key as base64 text (for key files)."""
        return base64.b64encode(self.key).decode("ascii")


class MasterKeys:
    """The active KEK plus older ones still readable, by id."""

    def __init__(self, active: MasterKey, older: Iterable[MasterKey] = ()) -> None:
        self.active = active
        self._by_id = {k.id: k for k in (*older, active)}

    def get(self, kek_id: str) -> MasterKey | None:
        """The KEK with this id, or None."""
        return self._by_id.get(kek_id)

    @property
    def ids(self) -> tuple[str, ...]:
        """Every KEK id in the ring, the active one first."""
        return (self.active.id, *(i for i in self._by_id if i != self.active.id))

    def __repr__(self) -> str:
        return f"MasterKeys(active={self.active.id!r}, ids={sorted(self._by_id)!r})"


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """An RSA service key pair (handshake wrap key) and its ``kid``."""

    private_key: rsa.RSAPrivateKey = field(repr=False)

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        """The public half."""
        return self.private_key.public_key()

    @property
    def kid(self) -> str:
        """SHA-256 hex of the public key's SPKI DER."""
        return kid_of(self.public_key)

    @property
    def public_pem(self) -> str:
        """The public key as PEM SPKI text."""
        return spki_pem(self.public_key)

    @property
    def wrapped_key_size(self) -> int:
        """The exact byte length of a key wrapped under this key."""
        return modulus_bytes(self.public_key)

    @classmethod
    def generate(cls, bits: int = 2048) -> ServiceKey:
        """A new RSA key pair (slow: tens of milliseconds; off the event loop)."""
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=bits))

    def private_pem(self) -> bytes:
        """PKCS#8 PEM of the private key, unencrypted (write it with mode 0600)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def load_service_key(path: Path, *, setting: str = "SEALSTREAM_SERVICE_KEY_FILE") -> ServiceKey:
    """Load a PEM RSA private key (validated: run once at start). ConfigError on failure."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{setting}: {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
        raise ConfigError(f"{setting}: {path} must hold an RSA key of at least 2048 bits")
    return ServiceKey(key)


def load_public_key(data: bytes | str, *, what: str = "service public key") -> rsa.RSAPublicKey:
    """Load a PEM SPKI RSA public key; ConfigError on failure."""
    raw = data.encode("ascii") if isinstance(data, str) else data
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError):
        raise ConfigError(f"{what}: not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigError(f"{what}: not an RSA public key")
    return key


def load_master_key_file(path: Path, *, setting: str = "SEALSTREAM_MASTER_KEY_FILE") -> MasterKeys:
    """Read a master key file: base64 lines, the first active, any more older KEKs."""
    try:
        text = path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise ConfigError(f"{setting}: cannot read {path}: {reason}") from None
    return parse_master_keys(text, setting=setting)


def parse_master_keys(text: str, *, setting: str) -> MasterKeys:
    """Parse base64 keys separated by newlines or commas: first active, rest older."""
    parts = [p for p in text.replace(",", "\n").split() if p]
    if not parts:
        raise ConfigError(f"{setting}: no master key given")
    keys = [MasterKey.from_base64(p, setting=setting) for p in parts]
    return MasterKeys(keys[0], keys[1:])


def write_keys(directory: Path, *, bits: int = 2048) -> ServiceKey:
    """Write ``service.pem`` (0600), ``service.pub.pem`` and ``master.key`` (0600).

    Refuses to overwrite existing files (a lost master key loses every session).
    """
    directory.mkdir(parents=True, exist_ok=True)
    names = ("service.pem", "service.pub.pem", "master.key")
    existing = [n for n in names if (directory / n).exists()]
    if existing:
        raise ConfigError(f"keygen: {directory} already has {', '.join(existing)}; not overwriting")
    service = ServiceKey.generate(bits)
    master = MasterKey.generate()
    _write_private(directory / "service.pem", service.private_pem())
    (directory / "service.pub.pem").write_text(service.public_pem, "ascii")
    _write_private(directory / "master.key", (master.to_base64() + "\n").encode("ascii"))
    return service


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
