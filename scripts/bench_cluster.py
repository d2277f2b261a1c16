"""``scripts/bench --cluster``: drain rate on one redis-server and on Redis Clusters of
1, 2 and 3 primaries, and the scaling ratio.

Each measurement starts its own servers on loopback (clusters without replicas, so
every Redis process serves), creates 20 sessions, pre-fills ``--requests`` sealed
SK+A256GCM echo requests of 256 bytes over 6 shards, then starts ``--processes``
worker processes and times the drain: from the first entry read to every shard
read with nothing pending. Workers and Redis share the machine's cores, so on a
small machine this measures CPU, not Redis: the report says how many cores there
were.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

from worker import codec, envelopes, wire
from worker.cluster import open_redis
from worker.handshake import SessionGrant
from worker.keyspace import GROUP, Names
from worker.protocol import ALG_SK, new_id, now_ms
from worker.streams import AnyRedis
from worker.testing import RedisServer, ThrowawayKeys
from worker.testservers import ClusterServers
from worker.trusted import create_session

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 6
SESSIONS = 20
PIPELINE = 500


@contextlib.contextmanager
def servers(primaries: int) -> Iterator[str]:
    """A URL of a fresh deployment: one plain server (0) or a cluster."""
    if primaries == 0:
        with RedisServer.start() as server:
            yield server.url
    else:
        with ClusterServers.start(primaries=primaries, replicas=0) as cluster:
            yield cluster.url


def seal(grants: list[SessionGrant], n: int) -> dict[int, list[dict[str, bytes]]]:
    """``n`` sealed 256-byte echo requests, by their default shard."""
    body = codec.dumps({"data": "x" * 240}, "e")
    names, now = Names(), now_ms()
    out: dict[int, list[dict[str, bytes]]] = {s: [] for s in range(SHARDS)}
    for i in range(n):
        g = grants[i % len(grants)]
        mid = new_id()
        sealed = envelopes.seal_request(
            field="e", alg=ALG_SK, sid=g.sid, mid=mid, ts=now, type_="echo",
            plaintext=body, public_key=None, ks=g.session_key,
        )  # fmt: skip
        out[names.default_shard(mid, SHARDS)].append(wire.encode_request(sealed.request))
    return out


async def drained(redis: AnyRedis, names: Names, n: int) -> tuple[int, int]:
    """(entries read, pending) summed over the shards."""
    read = pending = 0
    for shard in range(SHARDS):
        for g in await redis.xinfo_groups(names.request_stream(shard)):
            if g["name"] in (GROUP, GROUP.encode()):
                read += int(g.get("entries-read") or 0)
                pending += int(g["pending"])
    return read, pending


def start_workers(env: dict[str, str], count: int, concurrency: int) -> list[Any]:
    """``count`` worker processes (quiet: their logs are not measured)."""
    cmd = [sys.executable, "-m", "worker", "worker", "--concurrency", str(concurrency)]
    return [
        subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL) for _ in range(count)
    ]


async def measure(url: str, keys: ThrowawayKeys, args: argparse.Namespace, tmp: Path) -> float:
    """Requests per second drained by ``args.processes`` workers on ``url``."""
    prefix = f"bench{os.urandom(3).hex()}"
    names = Names(prefix)
    redis = await open_redis(url)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for shard in range(SHARDS):
            await redis.xgroup_create(names.request_stream(shard), GROUP, id="0", mkstream=True)
        grants = [await create_session(redis, keys.master, prefix=prefix) for _ in range(SESSIONS)]
        for shard, entries in seal(grants, args.requests).items():
            for start in range(0, len(entries), PIPELINE):
                async with redis.pipeline(transaction=False) as pipe:
                    for entry in entries[start : start + PIPELINE]:
                        pipe.xadd(names.request_stream(shard), entry)
                    await pipe.execute()
        env = {
            **os.environ,
            **keys.write(tmp / "keys"),
            "SEALSTREAM_REDIS_URL": url,
            "SEALSTREAM_PREFIX": prefix,
            "SEALSTREAM_SHARDS": str(SHARDS),
            "SEALSTREAM_LOG_LEVEL": "warning",
        }
        procs = start_workers(env, args.processes, args.concurrency)
        t0: float | None = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            read, pending = await drained(redis, names, args.requests)
            now = time.perf_counter()
            if t0 is None and read:
                t0 = now
            if t0 is not None and read >= args.requests and not pending:
                return args.requests / max(now - t0, 1e-6)
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker exited early")
            await anyio.sleep(0.005)
        raise RuntimeError("drain timed out")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
        await redis.aclose()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every deployment; the result as a dict (``rates`` by label)."""
    keys = ThrowawayKeys.generate()
    labels = {p: "single server" if p == 0 else f"cluster, {p} primaries" for p in (0, 1, 2, 3)}
    runs: dict[str, list[float]] = {label: [] for label in labels.values()}
    load = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="sealstream-bench-cluster-") as tmp:
        # Round-robin over the deployments: the machine's drift spreads over all of them.
        for _ in range(args.repeat):
            for primaries, label in labels.items():
                with servers(primaries) as url:
                    runs[label].append(anyio.run(measure, url, keys, args, Path(tmp)))
                print(f"  {label}: {runs[label][-1]:,.0f} req/s", file=sys.stderr)
    rates = {label: sorted(r)[len(r) // 2] for label, r in runs.items()}
    one = rates["cluster, 1 primaries"]
    return {
        "machine": f"{os.cpu_count()} cores",
        "setup": (
            f"SK+A256GCM echo, 256 B, {args.requests} requests pre-filled over {SHARDS} shards,"
            f" {SESSIONS} sessions, {args.processes} worker processes --concurrency"
            f" {args.concurrency}; clusters without replicas; median of {args.repeat}"
        ),
        "load_average_start_end": [load, [round(x, 2) for x in os.getloadavg()]],
        "runs": {k: [round(v) for v in r] for k, r in runs.items()},
        "rates": {k: round(v) for k, v in rates.items()},
        "scaling_vs_1_primary": {
            k: round(v / one, 2) for k, v in rates.items() if k.startswith("cluster")
        },
    }


def summary(out: dict[str, Any]) -> str:
    """The result as a small table."""
    lines = [f"Redis Cluster drain ({out['machine']}; {out['setup']})"]
    lines += [f"load average at start, end: {out['load_average_start_end']}", ""]
    lines.append(f"{'deployment':<26} {'req/s':>8} {'vs 1 primary':>13}  runs")
    for label, rate in out["rates"].items():
        ratio = out["scaling_vs_1_primary"].get(label)
        shown = "" if ratio is None else f"{ratio:.2f}x"
        runs = ", ".join(f"{r:,}" for r in out["runs"][label])
        lines.append(f"{label:<26} {rate:>8,} {shown:>13}  {runs}")
    return "\n".join(lines)
