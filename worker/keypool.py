"""Session RSA key pairs made ahead of time, off the event loop.

A handshake needs a new RSA pair (35-150 ms of CPU for 2048 bits). The pool keeps a
few ready, refilled in a background thread while the worker is idle, so a handshake
usually takes one at once; when the pool is empty a handshake makes its own, in the
handshake lane's threads (never the event loop, never the ordinary requests' threads).
"""

from __future__ import annotations

import anyio
from anyio.abc import TaskStatus
from cryptography.hazmat.primitives.asymmetric import rsa


def generate(bits: int) -> rsa.RSAPrivateKey:
    """A fresh RSA private key (slow: call it in a thread)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


class KeyPool:
    """Up to ``size`` ready key pairs of ``bits`` bits; run :meth:`run` to keep it full."""

    def __init__(self, *, bits: int, size: int, limiter: anyio.CapacityLimiter) -> None:
        self.bits = bits
        self.size = size
        self._limiter = limiter
        self._ready: list[rsa.RSAPrivateKey] = []
        self._taken = anyio.Event()

    def __len__(self) -> int:
        return len(self._ready)

    async def take(self) -> rsa.RSAPrivateKey:
        """A ready key pair, or one made now in a thread."""
        self._taken.set()
        if self._ready:
            return self._ready.pop()
        return await anyio.to_thread.run_sync(generate, self.bits, limiter=self._limiter)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Refill the pool whenever a key is taken, until cancelled.

        It starts filling at the first handshake, so a worker that serves none
        spends nothing on it.
        """
        task_status.started()
        while True:
            await self._taken.wait()
            self._taken = anyio.Event()
            while len(self._ready) < self.size:
                key = await anyio.to_thread.run_sync(generate, self.bits, limiter=self._limiter)
                self._ready.append(key)
