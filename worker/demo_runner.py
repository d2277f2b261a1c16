"""``sealstream demo``: a worker pool and a producer, end to end, then a clean stop.

Uses ``SEALSTREAM_REDIS_URL`` when set; otherwise the default URL when a server
answers there (under a throwaway prefix, removed afterwards); otherwise a private
``redis-server`` on a free port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from worker.client import Client
from worker.demo_app import produce
from worker.keys import write_keys
from worker.settings import DEFAULT_REDIS_URL, redacted_url
from worker.streams import connect
from worker.testing import RedisServer


def _answers(url: str) -> bool:
    async def ping() -> bool:
        client = connect(url)
        try:
            with anyio.fail_after(2):
                return bool(await client.ping())
        except Exception:
            return False
        finally:
            await client.aclose()

    return anyio.run(ping)


def run_demo(*, workers: int, sessions: int, jobs: int) -> int:
    """Run the demo; return the process exit code."""
    server: RedisServer | None = None
    url = os.environ.get("SEALSTREAM_REDIS_URL")
    if not url:
        if _answers(DEFAULT_REDIS_URL):
            url = DEFAULT_REDIS_URL
        else:
            server = RedisServer.launch()
            url = server.url
            print(f"started a private redis-server on port {server.port}")
    prefix = f"sealstream-demo-{os.urandom(4).hex()}"
    tmp = Path(tempfile.mkdtemp(prefix="sealstream-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        service = write_keys(tmp / "keys")
        print(f"redis {redacted_url(url)}, prefix {prefix}, service kid {service.kid[:16]}...")
        env = {
            **os.environ,
            "SEALSTREAM_REDIS_URL": url,
            "SEALSTREAM_PREFIX": prefix,
            "SEALSTREAM_SERVICE_KEY_FILE": str(tmp / "keys" / "service.pem"),
            "SEALSTREAM_MASTER_KEY_FILE": str(tmp / "keys" / "master.key"),
            "SEALSTREAM_LOG_FORMAT": "json",
        }
        for i in range(workers):
            log = (tmp / f"worker-{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker", "worker", "--concurrency", "32"],
                    env=env,
                    stdout=log,
                    stderr=log,
                )
            )
        print(f"started {workers} worker processes (logs in {tmp})")
        summary = anyio.run(_produce, url, prefix, service.kid, sessions, jobs)
        codes = _stop(procs)
        summary["worker_exit_codes"] = codes
        _print(summary)
        ok = summary["mismatches"] == 0 and all(c == 0 for c in codes)
        print("demo " + ("passed" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(tmp / "keys", ignore_errors=True)  # throwaway keys; the logs stay
        if server is not None:
            server.stop()
        else:
            anyio.run(_cleanup, url, prefix)


async def _produce(url: str, prefix: str, kid: str, sessions: int, jobs: int) -> dict[str, Any]:
    async with Client.from_url(url, kid=kid, prefix=prefix) as client:
        with anyio.fail_after(30):
            while "kid" not in await client.store.read_config():  # noqa: ASYNC110 - another process
                await anyio.sleep(0.05)
        return await produce(client, sessions=sessions, jobs=jobs)


def _stop(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


async def _cleanup(url: str, prefix: str) -> None:
    client = connect(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def _print(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2))
