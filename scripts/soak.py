"""sealstream memory soak: is one worker's RSS flat from 100k to 1M requests?

Starts a private redis-server and one worker process (demo app, SK echo), creates
10,000 sessions, then keeps a backlog of pre-sealed 1 KiB requests spread over all
sessions until N have been answered, sampling the worker's resident memory (VmRSS)
as it goes. Prints one JSON object: RSS at 100k and at N requests, their ratio, and
the rate. The sessions share one RSA key pair (the soak measures the worker, not key
generation; each has its own sid and session key, so the worker caches 10,000).

    scripts/soak [--requests 1000000] [--sessions 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from worker import codec, envelopes, wire
from worker.keyspace import GROUP, Names
from worker.protocol import ALG_SK, now_ms
from worker.sessions import Session, seal_record
from worker.streams import connect
from worker.testing import RedisServer, ThrowawayKeys

_CHUNK = 5_000


def rss_bytes(pid: int) -> int:
    """The process's resident set size now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def soak(
    url: str, prefix: str, keys: ThrowawayKeys, n: int, sessions: int, pid: int
) -> dict[str, Any]:
    redis = connect(url)
    names = Names(prefix)
    stream = names.request_stream(0)
    try:
        shared = keys.service.private_key  # one RSA pair for every session (see above)
        now = now_ms()
        grants: list[tuple[str, bytes]] = []
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(sessions):
                sid, ks = os.urandom(16).hex(), os.urandom(32)
                session = Session(
                    sid=sid, private_key=shared, ks=ks, created=now, expires=now + 7_200_000
                )
                pipe.set(names.session(sid), seal_record(session, keys.master.active), px=7_200_000)
                grants.append((sid, ks))
            await pipe.execute()
        body = codec.dumps({"pad": "x" * 1000}, "e")
        sent, samples, t0 = 0, [], time.perf_counter()
        rss_at_100k = None
        while True:
            (group,) = [g for g in await redis.xinfo_groups(stream) if g["name"] == GROUP.encode()]
            done = int(group["entries-read"] or 0) - int(group["pending"])
            if rss_at_100k is None and done >= 100_000:
                rss_at_100k = rss_bytes(pid)
            if done >= n:
                break
            backlog = sent - int(group["entries-read"] or 0)
            if sent < n and backlog < 2 * _CHUNK:
                async with redis.pipeline(transaction=False) as pipe:
                    for i in range(sent, min(n, sent + _CHUNK)):
                        sid, ks = grants[i % sessions]
                        out = envelopes.seal_request(
                            field="e", alg=ALG_SK, sid=sid, mid=os.urandom(16).hex(),
                            ts=now_ms(), type_="echo", plaintext=body, ks=ks,
                        )  # fmt: skip
                        pipe.xadd(stream, wire.encode_request(out.request))
                    await pipe.execute()
                sent = min(n, sent + _CHUNK)
            else:
                await anyio.sleep(0.05)
            if len(samples) < 100_000 and done:
                samples.append((done, rss_bytes(pid)))
        elapsed = time.perf_counter() - t0
        rss_end = rss_bytes(pid)
        return {
            "requests": n,
            "sessions": sessions,
            "seconds": round(elapsed, 1),
            "per_s": round(n / elapsed),
            "rss_at_100k_mib": round((rss_at_100k or 0) / 2**20, 1),
            "rss_at_end_mib": round(rss_end / 2**20, 1),
            "rss_end_over_100k": round(rss_end / rss_at_100k, 3) if rss_at_100k else None,
            "rss_max_mib": round(max(r for _, r in samples) / 2**20, 1),
            "redis_used_memory_mib": round(
                int((await redis.info("memory"))["used_memory"]) / 2**20
            ),
        }
    finally:
        await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    args = parser.parse_args()
    keys = ThrowawayKeys.generate()
    tmp = Path(tempfile.mkdtemp(prefix="sealstream-soak-"))
    prefix = f"soak{os.urandom(3).hex()}"
    with RedisServer.start() as server:
        env = {
            **os.environ,
            **keys.write(tmp),
            "SEALSTREAM_REDIS_URL": server.url,
            "SEALSTREAM_PREFIX": prefix,
            "SEALSTREAM_LOG_LEVEL": "warning",
            "SEALSTREAM_REPLY_MAXLEN": "100",
        }
        anyio.run(_groups, server.url, prefix)
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker", "--concurrency", "64"],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            result = anyio.run(
                soak, server.url, prefix, keys, args.requests, args.sessions, worker.pid
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(60)
    result["command"] = " ".join(["scripts/soak", *sys.argv[1:]])
    result["worker_exit_code"] = code
    print(json.dumps(result, indent=2))
    return 0 if code == 0 else 1


async def _groups(url: str, prefix: str) -> None:
    redis = connect(url)
    try:
        await redis.xgroup_create(Names(prefix).request_stream(0), GROUP, id="0", mkstream=True)
    finally:
        await redis.aclose()


if __name__ == "__main__":
    sys.exit(main())
