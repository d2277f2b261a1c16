"""sealstream benchmark: throughput per algorithm and round-trip latency.

Starts a private redis-server, N worker processes (`python -m worker worker`),
pushes pre-sealed echo requests from many sessions in pipelines, and times until
every reply is in its reply stream. Then measures sequential request latency
through the Python client. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from worker import messages, wire
from worker.backend import create_session
from worker.client import Client, new_id
from worker.envelope import ALG_RSA, ALG_SK
from worker.keys import load_public_key
from worker.names import Names
from worker.streams import connect
from worker.testing import RedisServer, ThrowawayKeys


async def _throughput(
    url: str, prefix: str, keys: ThrowawayKeys, alg: str, n: int, sessions: int
) -> dict[str, Any]:
    redis = connect(url)
    names = Names(prefix)
    try:
        grants = [await create_session(redis, keys.master, prefix=prefix) for _ in range(sessions)]
        publics = [load_public_key(g.public_key_pem) for g in grants]
        entries = []
        for i in range(n):
            g = grants[i % sessions]
            out = messages.seal_request(
                field="e",
                alg=alg,
                sid=g.sid,
                mid=new_id(),
                ts=time.time_ns() // 1_000_000,
                type_="echo",
                plaintext=wire.dumps({"i": i, "pad": "x" * 64}, "e"),
                public_key=publics[i % sessions] if alg == ALG_RSA else None,
                ks=g.session_key if alg == ALG_SK else None,
            )
            entries.append(wire.encode_request(out.request))
        t0 = time.perf_counter()
        for start in range(0, n, 500):
            async with redis.pipeline(transaction=False) as pipe:
                for e in entries[start : start + 500]:
                    pipe.xadd(names.request_stream(0), e)
                await pipe.execute()
        push_s = time.perf_counter() - t0
        while True:
            async with redis.pipeline(transaction=False) as pipe:
                for g in grants:
                    pipe.xlen(names.reply_stream(g.sid))
                done = sum(await pipe.execute())
            if done >= n:
                break
            await anyio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        return {
            "alg": alg,
            "requests": n,
            "seconds": round(elapsed, 3),
            "per_s": round(n / elapsed),
            "push_s": round(push_s, 3),
        }
    finally:
        await redis.aclose()


async def _latency(url: str, prefix: str, kid: str, alg: str, n: int) -> dict[str, Any]:
    async with Client.from_url(url, kid=kid, prefix=prefix) as client, client.session(alg=alg) as s:
        for _ in range(20):  # warm up
            await s.request("echo", {"warm": True})
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            await s.request("echo", {"i": i})
            samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "alg": alg,
        "requests": n,
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 2),
    }


async def _wait_for_workers(url: str, prefix: str) -> None:
    redis = connect(url)
    try:
        with anyio.fail_after(30):
            while not await redis.hexists(Names(prefix).config, "kid"):  # noqa: ASYNC110 - another process
                await anyio.sleep(0.05)
    finally:
        await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--requests", type=int, default=20000, help="per algorithm (RSA: a quarter)"
    )
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--latency", type=int, default=500)
    args = parser.parse_args()
    keys = ThrowawayKeys.generate()
    tmp = Path(tempfile.mkdtemp(prefix="sealstream-bench-"))
    prefix = f"bench{os.urandom(3).hex()}"
    with RedisServer.start() as server:
        env = {
            **os.environ,
            **keys.write(tmp),
            "SEALSTREAM_REDIS_URL": server.url,
            "SEALSTREAM_PREFIX": prefix,
            "SEALSTREAM_LOG_LEVEL": "warning",
            "SEALSTREAM_LOG_FORMAT": "json",
        }
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "worker", "worker", "--concurrency", str(args.concurrency)],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(args.workers)
        ]
        try:
            results: dict[str, Any] = {
                "command": " ".join(["scripts/bench", *sys.argv[1:]]),
                "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
                "workers": args.workers,
                "concurrency": args.concurrency,
            }

            async def run() -> None:
                await _wait_for_workers(server.url, prefix)
                results["throughput"] = [
                    await _throughput(
                        server.url, prefix, keys, ALG_SK, args.requests, args.sessions
                    ),
                    await _throughput(
                        server.url, prefix, keys, ALG_RSA, args.requests // 4, args.sessions
                    ),
                ]
                results["latency"] = [
                    await _latency(server.url, prefix, keys.service.kid, ALG_SK, args.latency),
                    await _latency(server.url, prefix, keys.service.kid, ALG_RSA, args.latency),
                ]

            anyio.run(run)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            codes = [p.wait(30) for p in procs]
    results["worker_exit_codes"] = codes
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
