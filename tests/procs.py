"""Worker processes for fault tests: started, signalled and killed like in production."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from tests.helpers import Raw, wait_until
from worker import wire
from worker.handshake import SessionGrant
from worker.settings import Settings
from worker.testing import ThrowawayKeys


@dataclass
class WorkerProcs:
    """Starts ``python -m worker worker`` processes against the test's Redis and prefix."""

    settings: Settings
    keys: ThrowawayKeys
    directory: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            **self.keys.write(self.directory / "keys"),
            "SEALSTREAM_REDIS_URL": self.settings.redis_url,
            "SEALSTREAM_PREFIX": self.settings.prefix,
            "SEALSTREAM_CLAIM_IDLE_MS": "1000",
            "SEALSTREAM_LOG_FORMAT": "json",
            "SEALSTREAM_GRACE_S": "20",
        }
        env.update(extra)
        return env

    def start(self, *args: str, **extra_env: str) -> subprocess.Popen[bytes]:
        """Start one worker process; its log goes to a file in the test's directory."""
        with (self.directory / f"worker-{len(self.procs)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "worker", *args],
                env=self.env(**extra_env),
                stdout=log,
                stderr=log,
            )
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        """Every worker's log so far."""
        return "".join(p.read_text() for p in sorted(self.directory.glob("worker-*.log")))

    def kill_all(self) -> None:
        """SIGKILL whatever is still running."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


async def wait_started(
    redis: aioredis.Redis, prefix: str, workers: int, timeout: float = 30.0
) -> None:
    """Wait until ``workers`` named worker connections are connected."""

    async def started() -> bool:
        clients = await redis.client_list()
        names = {
            c["name"].split(":")[1] for c in clients if c["name"].startswith("sealstream-worker:")
        }
        config = await redis.hgetall(f"{prefix}:config")
        return len(names) >= workers and bool(config)

    await wait_until(started, timeout=timeout, interval=0.05)


async def outcomes(raw: Raw, grants: list[SessionGrant]) -> dict[str, Counter[str]]:
    """Per mid, how many replies of each status (``ok``, ``error``, ``rejected:code``)."""
    out: dict[str, Counter[str]] = {}
    for grant in grants:
        for reply in await raw.replies(grant.sid):
            key = reply.status if reply.status != "rejected" else f"rejected:{reply.code}"
            out.setdefault(reply.mid, Counter())[key] += 1
    return out


async def wait_answered(
    raw: Raw, grants: list[SessionGrant], mids: set[str], timeout: float = 90.0
) -> dict[str, Counter[str]]:
    """Wait until every mid has at least one reply; return the outcomes."""

    async def answered() -> dict[str, Counter[str]] | None:
        got = await outcomes(raw, grants)
        return got if mids <= set(got) else None

    return await wait_until(answered, timeout=timeout, interval=0.1)


def encode_all(requests: list[wire.Request]) -> list[dict[str, bytes]]:
    """Stream entries for requests."""
    return [wire.encode_request(r) for r in requests]
