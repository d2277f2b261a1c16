"""sealstream benchmark: measure first, in one run.

For each algorithm and payload size (echo handler, 20 sessions, MessagePack):

1. drain rate of ONE worker process over requests pre-filled while no worker ran;
2. end-to-end rate with the producer pushing while that worker runs;
3. ceilings in the same run: a bare redis-py loop doing the same Redis work (no
   crypto, no framework) over the same pre-filled entries, and RSA-2048 OAEP-SHA256
   decrypts per second (1 and 2 threads);
4. latency p50/p95/p99 at about half the measured maximum drain rate (open loop),
   then the same during a burst of handshakes (the burst's worker keeps as many
   session keys ready, ``SEALSTREAM_HANDSHAKE_POOL``; both runs start once the
   worker's pool is full);
5. peak worker RSS and Redis memory per session and per replay record;
6. the drain rate of several worker processes and its ratio to one;
7. (``--peers``) the same echo work with AES-GCM in taskiq-redis, arq and SAQ;
8. (``--cluster``, alone) the drain on one server and on clusters of 1, 2 and 3
   primaries (``scripts/bench_cluster.py``).

Every measurement starts its own private ``redis-server``. Uses only the stable
APIs (``create_session``, ``envelopes.seal_request``, ``wire.encode_request`` /
``decode_reply``, ``Names``, ``connect``, ``RedisServer``, ``ThrowawayKeys``,
``free_port``, ``Settings``), the worker CLI and its metrics endpoint. Prints a
summary table (``--json``: one JSON object instead) and a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import hiredis
import msgpack
import redis as sync_redis
import redis.asyncio as aioredis
from anyio.abc import SocketStream
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519

from worker import envelopes, wire
from worker.handshake import SessionGrant
from worker.keyspace import GROUP, Names
from worker.settings import Settings
from worker.streams import connect
from worker.testing import RedisServer, ThrowawayKeys, free_port
from worker.trusted import create_session

ROOT = Path(__file__).resolve().parent.parent
# The protocol's names (PROTOCOL.md), spelled here so the bench leans on no internals.
ALG_SK = "SK+A256GCM"
ALG_RSA = "RSA-OAEP-256+A256GCM"
HANDSHAKE_TYPE = "sealstream.handshake"
KIB = 1024
SIZES = {"256": 256, "4k": 4 * KIB, "64k": 64 * KIB}
ALGS = {"sk": ALG_SK, "rsa": ALG_RSA}
SHORT = {ALG_SK: "SK", ALG_RSA: "RSA"}
PIPELINE = 500
BARE_GROUP = "bare"
Entries = list[dict[str, bytes]]


# -- helpers ---------------------------------------------------------------------------


def new_id() -> str:
    """A fresh ``sid``/``mid``: 16 random bytes as 32 lowercase hex characters."""
    return os.urandom(16).hex()


def pack(value: Any) -> bytes:
    """MessagePack (the ``e`` encoding)."""
    return bytes(msgpack.packb(value, use_bin_type=True))


def load_public_key(pem: str) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, rsa.RSAPublicKey):
        raise TypeError("not an RSA public key")
    return key


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def size_label(size: int) -> str:
    return f"{size // KIB} KiB" if size >= KIB and size % KIB == 0 else f"{size} B"


def payload(size: int) -> Any:
    """An echo payload whose MessagePack encoding is ``size`` bytes (for size >= 8)."""
    blob = os.urandom(max(0, size - 6))
    for cut in range(0, 8):
        value = {"p": blob[: max(0, len(blob) - cut)]}
        if len(pack(value)) <= size:
            return value
    return {"p": b""}


def stream_ms(entry_id: bytes | str) -> int:
    """The millisecond part of a stream entry id: when Redis added the entry."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def redis_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "missing"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip()


def vm_hwm_bytes(pid: int) -> int | None:
    """Peak resident set size of a process (VmHWM), in bytes."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system) of a process so far, or of this one (``pid`` None)."""
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def cpu_us_per(before: float | None, after: float | None, n: int) -> float | None:
    """Microseconds of CPU per request between two :func:`cpu_seconds` readings."""
    if before is None or after is None or n <= 0:
        return None
    return round((after - before) / n * 1e6, 1)


class Progress:
    """A progress bar on stderr: one step per measurement."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.label = ""

    def step(self, label: str) -> None:
        self.label = label
        self._draw()

    def advance(self) -> None:
        self.done += 1
        self._draw()

    def _draw(self) -> None:
        width = 28
        filled = int(width * min(self.done, self.total) / self.total)
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.monotonic() - self.started
        text = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s  {self.label}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + text[:150])
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# -- a private Redis with keys, sessions and worker processes ---------------------------


@dataclass
class Bed:
    """One measurement's private redis-server, key prefix and worker processes."""

    server: RedisServer
    keys: ThrowawayKeys
    key_env: dict[str, str]
    tmp: Path
    concurrency: int
    reply_maxlen: int = 1000
    prefix: str = field(default_factory=lambda: f"bench{os.urandom(3).hex()}")
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    grants: list[SessionGrant] = field(default_factory=list)
    held_back: dict[str, bytes] = field(default_factory=dict)

    @property
    def names(self) -> Names:
        return Names(self.prefix)

    @property
    def stream(self) -> str:
        return self.names.request_stream(0)

    @property
    def url(self) -> str:
        return self.server.url

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            **self.key_env,
            "SEALSTREAM_REDIS_URL": self.url,
            "SEALSTREAM_PREFIX": self.prefix,
            "SEALSTREAM_LOG_LEVEL": "warning",
            "SEALSTREAM_LOG_FORMAT": "json",
            "SEALSTREAM_REPLY_MAXLEN": str(self.reply_maxlen),
            # No session keys made ahead while a drain waits to start (the latency
            # runs set a pool of their own).
            "SEALSTREAM_HANDSHAKE_POOL": "0",
        }

    def start_workers(self, count: int, extra_env: dict[str, str] | None = None) -> None:
        env = {**self.env(), **(extra_env or {})}
        if count > 1 and "SEALSTREAM_UNWRAP_PROCESSES" not in env:
            # As `sealstream worker --processes N` shares them out (worker.supervisor).
            cpus = Settings.from_env({}).unwrap_processes_or_cpus
            env["SEALSTREAM_UNWRAP_PROCESSES"] = str(max(1, cpus // count))
        for _ in range(count):
            log = open(self.tmp / f"worker-{self.prefix}-{len(self.procs)}.log", "wb")
            cmd = [sys.executable, "-m", "worker", "worker", "--concurrency", str(self.concurrency)]
            self.procs.append(
                subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            )
            log.close()

    def check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                log = self.tmp / f"worker-{self.prefix}-{i}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"worker exited early with {p.returncode}:\n{tail}")

    def peak_rss(self) -> list[int | None]:
        return [vm_hwm_bytes(p.pid) for p in self.procs]

    def stop_workers(self) -> list[int | None]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for p in self.procs:
            try:
                codes.append(p.wait(60))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes.append(None)
        self.procs = []
        return codes


@contextlib.contextmanager
def bed(keys: ThrowawayKeys, tmp: Path, concurrency: int, reply_maxlen: int) -> Iterator[Bed]:
    with RedisServer.start() as server:
        b = Bed(
            server=server,
            keys=keys,
            key_env=keys.write(tmp / "keys"),
            tmp=tmp,
            concurrency=concurrency,
            reply_maxlen=reply_maxlen,
        )
        try:
            yield b
        finally:
            if b.procs:
                b.stop_workers()


async def make_sessions(redis: aioredis.Redis, b: Bed, count: int) -> None:
    grants: list[SessionGrant | None] = [None] * count

    async def one(i: int) -> None:
        grants[i] = await create_session(redis, b.keys.master, prefix=b.prefix)

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    b.grants = [g for g in grants if g is not None]


def seal_many(b: Bed, alg: str, size: int, n: int) -> tuple[Entries, list[str]]:
    """``n`` pre-sealed echo requests spread over the bed's sessions, and their mids."""
    body = pack(payload(size))
    publics = [load_public_key(g.public_key_pem) for g in b.grants]
    out: Entries = []
    mids: list[str] = []
    ts = now_ms()
    for i in range(n):
        g = b.grants[i % len(b.grants)]
        mids.append(new_id())
        sealed = envelopes.seal_request(
            field="e",
            alg=alg,
            sid=g.sid,
            mid=mids[-1],
            ts=ts,
            type_="echo",
            plaintext=body,
            public_key=publics[i % len(publics)] if alg == ALG_RSA else None,
            ks=g.session_key if alg == ALG_SK else None,
        )
        out.append(wire.encode_request(sealed.request))
    return out, mids


#: hiredis's command packer (its type stub declares the argument a 1-tuple)
_pack_command: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command


class LeanRedis:
    """The latency run's measuring client: one RESP2 connection, hiredis packing the
    commands and parsing the replies, no per-command Python layer.

    The paced producer and the reply reader share the two cores with the worker and
    Redis; through redis-py they cost ~55 µs of CPU per request (a quarter of the
    machine at 7,000 requests/s), which this keeps for the measured processes.
    """

    def __init__(self, stream: SocketStream) -> None:
        self._stream = stream
        self._reader = hiredis.Reader()

    @classmethod
    async def connect(cls, url: str) -> LeanRedis:
        parts = urlsplit(url)
        return cls(await anyio.connect_tcp(parts.hostname or "127.0.0.1", parts.port or 6379))

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def send(self, commands: Sequence[tuple[str | int | bytes, ...]]) -> None:
        await self._stream.send(b"".join([_pack_command(c) for c in commands]))

    async def receive(self, count: int) -> list[Any]:
        """The next ``count`` replies; a Redis error raises."""
        out: list[Any] = []
        reader = self._reader
        while len(out) < count:
            reply = reader.gets()
            if reply is False:
                reader.feed(await self._stream.receive(1 << 20))
            elif isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"redis: {reply}")
            else:
                out.append(reply)
        return out


async def push(redis: aioredis.Redis, stream: str, entries: Entries) -> None:
    for start in range(0, len(entries), PIPELINE):
        async with redis.pipeline(transaction=False) as pipe:
            for e in entries[start : start + PIPELINE]:
                pipe.xadd(stream, e)
            await pipe.execute()


async def group_info(redis: aioredis.Redis, stream: str, group: str) -> tuple[int, int]:
    """(entries-read, pending) of ``group``."""
    for g in await redis.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            return int(g.get("entries-read") or 0), int(g["pending"])
    return 0, 0


async def reply_count(redis: aioredis.Redis, b: Bed) -> int:
    async with redis.pipeline(transaction=False) as pipe:
        for g in b.grants:
            pipe.xlen(b.names.reply_stream(g.sid))
        return sum(await pipe.execute())


async def time_drain(redis: aioredis.Redis, b: Bed, n: int, timeout: float) -> float:
    """Seconds from the first entry read to all ``n`` read and none pending."""
    t0: float | None = None
    deadline = time.monotonic() + timeout
    while True:
        read, pending = await group_info(redis, b.stream, GROUP)
        t = time.perf_counter()
        if t0 is None and read > 0:
            t0 = t
        if read >= n and pending == 0 and t0 is not None:
            return max(t - t0, 1e-6)
        if time.monotonic() > deadline:
            raise RuntimeError(f"drain timed out: {read}/{n} read, {pending} pending")
        b.check_alive()
        await anyio.sleep(0.003)


async def blocked_readers(redis: aioredis.Redis) -> int:
    """Worker connections blocked in XREADGROUP right now."""
    out = 0
    for c in await redis.client_list():
        name = str(c.get("name", ""))
        if name.startswith("sealstream-worker:") and c.get("cmd") == "xreadgroup":
            if "b" in str(c.get("flags", "")):
                out += 1
    return out


async def armed_start(redis: aioredis.Redis, b: Bed, processes: int, n: int) -> list[float | None]:
    """Start the workers so that all of them are reading before any entry is visible.

    The group is moved to the stream's end while the workers start (a consumer
    ``bench-hold`` keeps the first entry pending meanwhile, so the workers'
    trimmer, which never trims past a pending entry, leaves the pre-filled entries
    alone). Once every worker is blocked in XREADGROUP (CLIENT LIST: worker
    connections are named ``sealstream-worker:<consumer>``), the group goes back
    to id 0 and one more XADD (the last of the ``n`` requests, held back) wakes
    the blocked readers. The timing then starts at the first entry read as usual.
    Returns each worker's CPU time (:func:`cpu_seconds`) just before that.
    """
    info = await redis.xinfo_stream(b.stream)
    await redis.xreadgroup(GROUP, "bench-hold", {b.stream: ">"}, count=1)
    last = info["last-generated-id"]
    await redis.xgroup_setid(b.stream, GROUP, last, entries_read=info["length"])
    b.start_workers(processes)
    deadline = time.monotonic() + 60
    while True:
        if await blocked_readers(redis) >= processes:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not start reading within 60 s")
        b.check_alive()
        await anyio.sleep(0.01)
    cpu = [cpu_seconds(p.pid) for p in b.procs]
    await redis.xgroup_setid(b.stream, GROUP, "0", entries_read=0)
    await redis.xadd(b.stream, b.held_back)
    return cpu


# -- 1, 2, 3a, 5: drain, end to end, bare loop, memory ----------------------------------


def bare_loop(url: str, stream: str, prefix: str, n: int) -> float:
    """The same Redis work with no crypto and no framework: entries per second."""
    r = sync_redis.Redis.from_url(url)
    try:
        done = 0
        t0 = time.perf_counter()
        while done < n:
            resp = r.xreadgroup(BARE_GROUP, "bare-1", {stream: ">"}, count=100, block=1000)
            if not resp:
                break
            batch = resp[0][1]
            pipe = r.pipeline(transaction=False)
            for i, (_, fields) in enumerate(batch):
                pipe.xadd(f"{prefix}:bare:{(done + i) % 20}", fields, maxlen=1000, approximate=True)
            pipe.xack(stream, BARE_GROUP, *[eid for eid, _ in batch])
            pipe.execute()
            done += len(batch)
        elapsed = time.perf_counter() - t0
    finally:
        r.close()
    if done < n:
        raise RuntimeError(f"bare loop read only {done}/{n} entries")
    return n / elapsed


async def redis_memory(redis: aioredis.Redis, b: Bed) -> dict[str, Any]:
    """MEMORY USAGE of session and replay-record keys; used_memory per 1,000 records."""
    sessions = [b.names.session(g.sid) for g in b.grants]
    seen: list[bytes] = []
    async for key in redis.scan_iter(match=f"{b.prefix}:{{*}}:seen:*", count=1000):
        seen.append(key)
        if len(seen) >= 2000:
            break

    async def usage(keys: Sequence[str | bytes]) -> float:
        async with redis.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.memory_usage(k)
            sizes = [s for s in await pipe.execute() if s is not None]
        return statistics.fmean(sizes) if sizes else math.nan

    out: dict[str, Any] = {
        "session_key_bytes": round(await usage(sessions)),
        "replay_record_bytes": round(await usage(seen[:200])) if seen else None,
        "replay_records_sampled": min(len(seen), 200),
    }
    if seen:
        before = int((await redis.info("memory"))["used_memory"])
        async with redis.pipeline(transaction=False) as pipe:
            for k in seen:
                pipe.delete(k)
            await pipe.execute()
        after = int((await redis.info("memory"))["used_memory"])
        out["used_memory_per_1000_replay_records"] = round((before - after) * 1000 / len(seen))
        out["replay_records_deleted"] = len(seen)
    return out


async def measure_size(
    keys: ThrowawayKeys,
    tmp: Path,
    args: argparse.Namespace,
    alg: str,
    size: int,
    n: int,
    *,
    processes: int = 1,
    with_e2e: bool = True,
    with_bare: bool = True,
    with_memory: bool = False,
    sessions: int = 20,
) -> dict[str, Any]:
    """Drain (``processes`` workers), then end to end, bare loop and memory on one bed."""
    reply_maxlen = max(1000, math.ceil(n / sessions) + 100)
    with bed(keys, tmp, args.concurrency, reply_maxlen) as b:
        redis = connect(b.url)
        try:
            await make_sessions(redis, b, sessions)
            await redis.xgroup_create(b.stream, GROUP, id="0", mkstream=True)
            entries, _ = await anyio.to_thread.run_sync(seal_many, b, alg, size, n)
            b.held_back = entries.pop()
            await push(redis, b.stream, entries)
            del entries
            result: dict[str, Any] = {
                "alg": alg,
                "size": size,
                "requests": n,
                "processes": processes,
            }
            if with_bare:
                await redis.xgroup_create(b.stream, BARE_GROUP, id="0")
                result["bare_per_s"] = round(
                    await anyio.to_thread.run_sync(bare_loop, b.url, b.stream, b.prefix, n - 1)
                )
                await redis.delete(*[f"{b.prefix}:bare:{i}" for i in range(20)])
            cpu0 = await armed_start(redis, b, processes, n)
            drain_s = await time_drain(redis, b, n, timeout=max(120.0, n / 20))
            cpu1 = [cpu_seconds(p.pid) for p in b.procs]
            result["drain_s"] = round(drain_s, 3)
            result["drain_per_s"] = round(n / drain_s)
            if None not in cpu0 and None not in cpu1:
                # The workers' CPU over the drain, per request: steadier than a rate
                # on a shared machine, and comparable between machines' runs.
                result["drain_cpu_us_per_req"] = cpu_us_per(
                    sum(c for c in cpu0 if c is not None),
                    sum(c for c in cpu1 if c is not None),
                    n,
                )
            if with_e2e:
                await redis.delete(*[b.names.reply_stream(g.sid) for g in b.grants])
                entries, _ = await anyio.to_thread.run_sync(seal_many, b, alg, size, n)
                t0 = time.perf_counter()
                await push(redis, b.stream, entries)
                push_s = time.perf_counter() - t0
                del entries
                deadline = time.monotonic() + max(120.0, n / 20)
                while (got := await reply_count(redis, b)) < n:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"end to end timed out: {got}/{n} replies")
                    b.check_alive()
                    await anyio.sleep(0.005)
                e2e_s = time.perf_counter() - t0
                result["e2e_s"] = round(e2e_s, 3)
                result["e2e_per_s"] = round(n / e2e_s)
                result["e2e_push_s"] = round(push_s, 3)
            result["peak_rss_bytes"] = b.peak_rss()
            result["worker_exit_codes"] = b.stop_workers()
            if with_memory:
                result["redis_memory"] = await redis_memory(redis, b)
            return result
        finally:
            await redis.aclose()


# -- 3b: RSA ceiling -------------------------------------------------------------------


def rsa_ceiling(seconds: float, threads: int) -> float:
    """RSA-2048 OAEP-SHA256 decrypts per second over ``threads`` threads."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped = key.public_key().encrypt(os.urandom(32), oaep)
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def run(i: int) -> None:
        start.wait()
        c = 0
        while time.perf_counter() < stop_at[0]:
            key.decrypt(wrapped, oaep)
            c += 1
        counts[i] = c

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


# -- 4: latency --------------------------------------------------------------------------


def seal_handshakes(keys: ThrowawayKeys, count: int) -> tuple[Entries, list[str]]:
    """Handshake requests as ``Client.handshake`` builds them, sealed under the service key."""
    service = keys.service.public_key
    entries: Entries = []
    sids: list[str] = []
    for _ in range(count):
        sid, mid = new_id(), new_id()
        ec = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
        body = {"clientEphemeral": ec, "ttl": 3600}
        out = envelopes.seal_request(
            field="e",
            alg=ALG_RSA,
            sid=sid,
            mid=mid,
            ts=now_ms(),
            type_=HANDSHAKE_TYPE,
            plaintext=pack(body),
            public_key=service,
            kid=keys.service.kid,
            key=os.urandom(32),
        )
        entries.append(wire.encode_request(out.request))
        sids.append(sid)
    return entries, sids


async def measure_latency(
    keys: ThrowawayKeys,
    tmp: Path,
    args: argparse.Namespace,
    rate: float,
    seconds: float,
    handshakes: int,
    size: int = 4 * KIB,
) -> dict[str, Any]:
    """Open-loop paced SK requests at ``rate``/s; latency = reply arrival - send time."""
    n = max(1, int(rate * seconds))
    with bed(keys, tmp, args.concurrency, 1000) as b:
        redis = connect(b.url)
        reader = await LeanRedis.connect(b.url)
        producer = await LeanRedis.connect(b.url)
        try:
            await make_sessions(redis, b, 20)
            # The burst's run keeps as many session keys ready as it has handshakes
            # (made while the worker is quiet: SEALSTREAM_HANDSHAKE_POOL), the steady
            # run the default; both start once the pool is full.
            pool = args.handshake_pool if handshakes else Settings().handshake_pool
            metrics_port = free_port()
            b.start_workers(
                1,
                {
                    "SEALSTREAM_HANDSHAKE_POOL": str(pool),
                    "SEALSTREAM_METRICS_PORT": str(metrics_port),
                },
            )
            with anyio.fail_after(30):
                while not await redis.hexists(b.names.config, "kid"):
                    b.check_alive()
                    await anyio.sleep(0.05)
            t_started = time.perf_counter()
            entries, mids = await anyio.to_thread.run_sync(seal_many, b, ALG_SK, size, n)
            hs_entries, hs_sids = (
                await anyio.to_thread.run_sync(seal_handshakes, keys, handshakes)
                if handshakes
                else ([], [])
            )
            with anyio.fail_after(max(60.0, pool * 0.5)):
                while await anyio.to_thread.run_sync(keys_ready, metrics_port) < pool:
                    b.check_alive()
                    await anyio.sleep(0.1)
            # From the worker's start-up to a full pool, the requests sealed meanwhile.
            pool_ready_s = time.perf_counter() - t_started
            # What the setup made lives through the run: keep it out of the collector's
            # full passes, which would pause the producer and the reply reader.
            gc.collect()
            gc.freeze()
            sent: dict[str, float] = {}
            arrived: dict[str, float] = {}
            # Redis's clock on both sides of the worker: request and reply entry ids.
            added_ms: dict[str, int] = {}
            replied_ms: dict[str, int] = {}
            streams = {b.names.reply_stream(g.sid).encode(): b"0-0" for g in b.grants}
            finished = anyio.Event()

            async def read_replies() -> None:
                xread = ("XREAD", "COUNT", 1000, "BLOCK", 100, "STREAMS")
                while not finished.is_set():
                    await reader.send([(*xread, *streams, *streams.values())])
                    (resp,) = await reader.receive(1)
                    t = time.perf_counter()
                    for name, items in resp or []:
                        for eid, flat in items:
                            streams[name] = eid
                            mid = reply_mid(flat)
                            if mid not in arrived:
                                arrived[mid] = t
                                replied_ms[mid] = stream_ms(eid)
                    if len(arrived) >= n:
                        finished.set()

            tick = 0.005
            per_tick = rate * tick
            # CPU per request of the worker, Redis and this measuring client.
            pids = {"worker": b.procs[0].pid, "redis": b.server.process.pid, "client": None}
            cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_replies)
                t0 = time.perf_counter()
                if hs_entries:
                    await push(redis, b.stream, hs_entries)
                k = 0
                i = 0
                late = 0.0
                while i < n:
                    k += 1
                    due = t0 + k * tick
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await anyio.sleep(delay)
                    upto = min(n, int(k * per_tick))
                    if upto <= i:
                        continue
                    t_send = time.perf_counter()
                    await producer.send(
                        [("XADD", b.stream, "*", *_flat(entries[j])) for j in range(i, upto)]
                    )
                    ids = await producer.receive(upto - i)
                    for j, eid in zip(range(i, upto), ids, strict=True):
                        sent[mids[j]] = t_send
                        added_ms[mids[j]] = stream_ms(eid)
                    late = max(late, t_send - (t0 + upto / rate))
                    i = upto
                send_s = time.perf_counter() - t0
                with anyio.move_on_after(max(30.0, seconds)):
                    await finished.wait()
                finished.set()
                window_s = time.perf_counter() - t0
            cpu1 = {k: cpu_seconds(pid) for k, pid in pids.items()}
            answered = 0
            if hs_sids:
                async with redis.pipeline(transaction=False) as pipe:
                    for sid in hs_sids:
                        pipe.xlen(b.names.reply_stream(sid))
                    answered = sum(1 for x in await pipe.execute() if x)
            lat = sorted((arrived[m] - sent[m]) * 1000 for m in sent if m in arrived)
            # Request added -> reply added, by Redis's clock (1 ms steps): the part of
            # the latency spent between the two XADDs, whatever the producer's own lag.
            server = sorted(float(replied_ms[m] - added_ms[m]) for m in replied_ms if m in added_ms)
            result: dict[str, Any] = {
                "alg": ALG_SK,
                "size": size,
                "target_per_s": round(rate),
                "requests": n,
                "send_s": round(send_s, 2),
                "producer_max_late_ms": round(late * 1000, 1),
                "replies": len(lat),
                "p50_ms": round(percentile(lat, 0.50), 2),
                "p95_ms": round(percentile(lat, 0.95), 2),
                "p99_ms": round(percentile(lat, 0.99), 2),
                "max_ms": round(lat[-1], 2) if lat else None,
                "added_to_reply_p50_ms": percentile(server, 0.50),
                "added_to_reply_p99_ms": percentile(server, 0.99),
                "cpu_us_per_request": {k: cpu_us_per(cpu0[k], cpu1[k], n) for k in pids},
            }
            result["handshake_pool"] = pool
            result["handshake_pool_ready_s"] = round(pool_ready_s, 1)
            if handshakes:
                result["handshakes"] = handshakes
                result["handshakes_answered"] = answered
                result["handshakes_window_s"] = round(window_s, 2)
            result["worker_exit_codes"] = b.stop_workers()
            return result
        finally:
            gc.unfreeze()  # the next measurement's collector sees this one's leftovers
            await producer.aclose()
            await reader.aclose()
            await redis.aclose()


def keys_ready(port: int) -> float:
    """The worker's ``sealstream_handshake_keys_ready`` (0 until it serves metrics)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("sealstream_handshake_keys_ready "):
            return float(line.split()[1])
    return 0.0


def reply_mid(flat: list[bytes]) -> str:
    """The ``mid`` of a reply entry (its flat field/value list): read straight from a
    MessagePack ``e`` envelope (what the worker answers this bench's requests with),
    else through the strict ``wire.decode_reply``."""
    if len(flat) == 2 and flat[0] == b"e":
        env = msgpack.unpackb(flat[1])
        mid = env.get("mid") if isinstance(env, dict) else None
        if isinstance(mid, str):
            return mid
    return wire.decode_reply(dict(zip(flat[::2], flat[1::2], strict=True))).mid


def _flat(fields: dict[str, bytes]) -> tuple[str | bytes, ...]:
    return tuple(x for pair in fields.items() for x in pair)


# -- 7: peers (optional) ---------------------------------------------------------------

PEERS = {"taskiq-redis": "taskiq_redis", "arq": "arq", "saq": "saq"}
PEER_SIZE = KIB


#: The project's own dependencies: installing a peer must not move them.
PINNED = (
    "anyio",
    "cryptography",
    "redis",
    "hiredis",
    "msgpack",
    "orjson",
    "structlog",
    "prometheus-client",
)


def install_peer(package: str, module: str, tmp: Path) -> str | None:
    """pip install a peer into this venv unless importable; None, or why it failed."""
    if importlib.util.find_spec(module) is not None:
        return None
    pins = []
    for name in PINNED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pins.append(f"{name}=={importlib.metadata.version(name)}")
    constraints = tmp / "peer-constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    print(f"bench: installing {package} into {sys.prefix}", file=sys.stderr)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "-c", str(constraints), package],
        capture_output=True,
        text=True,
    )
    importlib.invalidate_caches()
    if done.returncode != 0 or importlib.util.find_spec(module) is None:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"pip install {package} failed: {lines[-1] if lines else done.returncode}"
    return None


def run_peer(peer: str, jobs: int, concurrency: int, tmp: Path) -> dict[str, Any]:
    """Pre-fill ``jobs`` jobs, start one worker process, time first job to last."""
    import bench_peers

    with RedisServer.start() as server:
        out = tmp / f"peer-{peer}.json"
        env = {
            **os.environ,
            "BENCH_PEER": peer,
            "BENCH_REDIS_URL": server.url,
            "BENCH_KEY": os.urandom(32).hex(),
            "BENCH_JOBS": str(jobs),
            "BENCH_CONCURRENCY": str(concurrency),
            "BENCH_OUT": str(out),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")]
            ),
        }
        fill = [sys.executable, str(ROOT / "scripts" / "bench_peers.py"), "fill", peer]
        filled = subprocess.run(
            [*fill, str(jobs), str(PEER_SIZE)], env=env, capture_output=True, text=True, timeout=600
        )
        if filled.returncode != 0:
            return {"note": f"fill failed: {filled.stderr.strip().splitlines()[-1:]}"}
        log_path = tmp / f"peer-{peer}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                bench_peers.COMMAND[peer](concurrency),
                env=env,
                cwd=ROOT / "scripts",
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + max(120.0, jobs / 20)
            while not out.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                    return {"jobs": jobs, "note": f"no result: {' | '.join(tail)}"[:300]}
                time.sleep(0.02)
            time.sleep(0.05)
            times = json.loads(out.read_text())
        finally:
            # Measured: the peer's own shutdown is not (its process group goes).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = times["last"] - times["first"]
        return {"jobs": jobs, "seconds": round(seconds, 3), "per_s": round(jobs / seconds)}


def run_peers(jobs: int, concurrency: int, tmp: Path) -> dict[str, Any]:
    """Each peer (installed into this venv when missing) over the same pre-filled job."""
    results: dict[str, Any] = {}
    for package, module in PEERS.items():
        failed = install_peer(package, module, tmp)
        if failed is not None:
            print(f"bench: skipping {package}: {failed}", file=sys.stderr)
            results[package] = {"note": failed}
            continue
        results[package] = run_peer(package, jobs, concurrency, tmp)
    return results


# -- the run -------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return None
    # Not rounded here: the summary prints two decimals of the exact ratio (rounding
    # to three first turned 3,653 / 2,494 = 1.4647 into 1.47).
    return a / b


async def run(args: argparse.Namespace, progress: Progress, out: dict[str, Any]) -> None:
    keys = ThrowawayKeys.generate()
    tmp = Path(tempfile.mkdtemp(prefix="sealstream-bench-"))
    try:
        await _run(args, progress, out, keys, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def requests_for(args: argparse.Namespace, alg: str, size: int) -> int:
    n: int = args.requests if alg == ALG_SK else max(1, args.requests // 4)
    return max(1, min(n, int(args.max_bytes) // size))


RATES = ("drain_per_s", "e2e_per_s", "bare_per_s")
#: other per-run figures whose median a repeated measurement shows
MEDIANS = ("drain_cpu_us_per_req",)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one measurement: the median of each rate, every run's rates kept."""
    if len(runs) == 1:
        return runs[0]
    row = dict(runs[0])
    row["runs"] = len(runs)
    for key in ("drain_s", "e2e_s", "e2e_push_s"):
        row.pop(key, None)
    for key in RATES:
        values = [r[key] for r in runs if key in r]
        if values:
            row[key] = round(statistics.median(values))
            row[f"{key}_runs"] = values
    for key in MEDIANS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[key] = round(statistics.median(values), 1)
            row[f"{key}_runs"] = values
    for key in ("peak_rss_bytes", "worker_exit_codes"):
        row[key] = [x for r in runs for x in r.get(key, [])]
    return row


async def attempt(
    out: dict[str, Any],
    label: str,
    measure: Callable[[], Awaitable[dict[str, Any]]],
    repeat: int = 1,
) -> dict[str, Any] | None:
    """Run one measurement ``repeat`` times; a failure is recorded and the run goes on."""
    runs = []
    for _ in range(repeat):
        try:
            runs.append(await measure())
        except Exception as exc:
            out.setdefault("failures", []).append(f"{label}: {type(exc).__name__}: {exc}")
            print(f"\nbench: {label} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return combine(runs) if runs else None


async def _run(
    args: argparse.Namespace,
    progress: Progress,
    out: dict[str, Any],
    keys: ThrowawayKeys,
    tmp: Path,
) -> None:
    sizes: list[int] = args.sizes
    algs: list[str] = args.algs
    memory_size = 4 * KIB if 4 * KIB in sizes else sizes[0]
    rows: list[dict[str, Any]] = []
    ceil1 = ceil2 = math.nan
    for alg in algs:
        if alg == ALG_RSA:
            # Measured right before the RSA drains: the machine's speed drifts.
            progress.step("RSA-2048 OAEP-SHA256 ceiling, 1 and 2 threads")
            ceil1 = await anyio.to_thread.run_sync(rsa_ceiling, args.rsa_seconds, 1)
            ceil2 = await anyio.to_thread.run_sync(rsa_ceiling, args.rsa_seconds, 2)
            out["rsa_ceiling"] = {"threads_1_per_s": round(ceil1), "threads_2_per_s": round(ceil2)}
            progress.advance()
        for size in sizes:
            n = requests_for(args, alg, size)
            label = f"{SHORT[alg]} {size_label(size)}"
            progress.step(f"{label}: bare loop, drain, end to end")
            row = await attempt(
                out,
                label,
                partial(
                    measure_size,
                    keys,
                    tmp,
                    args,
                    alg,
                    size,
                    n,
                    with_memory=alg == ALG_SK and size == memory_size,
                ),
                args.repeat,
            )
            progress.advance()
            if row is None:
                continue
            if alg == ALG_SK:
                row["drain_vs_bare"] = ratio(row["drain_per_s"], row.get("bare_per_s"))
            else:
                row["drain_vs_rsa_1_thread"] = ratio(row["drain_per_s"], ceil1)
                row["drain_vs_rsa_2_threads"] = ratio(row["drain_per_s"], ceil2)
            rows.append(row)
    out["throughput"] = rows

    if args.latency_seconds > 0:
        sk = [r for r in rows if r["alg"] == ALG_SK]
        at = next((r for r in sk if r["size"] == 4 * KIB), None)
        max_rate = at["drain_per_s"] if at else None
        if max_rate is None:
            progress.step("drain rate for the latency target (SK 4 KiB)")
            probe = await attempt(
                out,
                "SK 4 KiB drain for the latency target",
                partial(
                    measure_size,
                    keys,
                    tmp,
                    args,
                    ALG_SK,
                    4 * KIB,
                    requests_for(args, ALG_SK, 4 * KIB),
                    with_e2e=False,
                    with_bare=False,
                ),
            )
            max_rate = probe["drain_per_s"] if probe else None
        latency = []
        if max_rate:
            rate = args.latency_fraction * max_rate
            for burst in (0, args.handshakes):
                what = f" during {burst} handshakes" if burst else ""
                progress.step(f"latency at {rate:.0f} req/s (SK 4 KiB){what}")
                r = await attempt(
                    out,
                    f"latency{what}",
                    partial(measure_latency, keys, tmp, args, rate, args.latency_seconds, burst),
                )
                progress.advance()
                if r is not None:
                    r["fraction"] = args.latency_fraction
                    r["of_drain_per_s"] = max_rate
                    latency.append(r)
        out["latency"] = latency

    if args.processes > 1:
        scaling = []
        size = 4 * KIB if 4 * KIB in sizes else sizes[0]
        for alg in algs:
            n = requests_for(args, alg, size)
            progress.step(f"{SHORT[alg]} {size_label(size)}: drain with {args.processes} processes")
            row = await attempt(
                out,
                f"{SHORT[alg]} {size_label(size)} with {args.processes} processes",
                partial(
                    measure_size,
                    keys,
                    tmp,
                    args,
                    alg,
                    size,
                    n,
                    processes=args.processes,
                    with_e2e=False,
                    with_bare=False,
                ),
                args.repeat,
            )
            progress.advance()
            if row is None:
                continue
            one = next((r for r in rows if r["alg"] == alg and r["size"] == size), None)
            row["vs_1_process"] = ratio(row["drain_per_s"], one["drain_per_s"] if one else None)
            scaling.append(row)
        out["processes"] = scaling

    if args.peers:
        progress.step("peers: taskiq-redis, arq, saq (1 KiB echo with AES-GCM)")
        ours = await attempt(
            out,
            "SK 1 KiB drain for the peers",
            partial(
                measure_size,
                keys,
                tmp,
                args,
                ALG_SK,
                PEER_SIZE,
                requests_for(args, ALG_SK, PEER_SIZE),
                with_e2e=False,
                with_bare=False,
            ),
        )
        peers = await anyio.to_thread.run_sync(run_peers, args.peer_jobs, args.concurrency, tmp)
        best = max((p.get("per_s") or 0 for p in peers.values()), default=0)
        ours_rate = ours["drain_per_s"] if ours else None
        out["peers"] = {
            "results": peers,
            "sealstream_per_s": ours_rate,
            "sealstream_vs_best": ratio(ours_rate, best),
        }
        progress.advance()


def count_steps(args: argparse.Namespace) -> int:
    steps = len(args.sizes) * len(args.algs) + (1 if ALG_RSA in args.algs else 0)
    if args.latency_seconds > 0:
        steps += 2
    if args.processes > 1:
        steps += len(args.algs)
    if args.peers:
        steps += 1
    return steps


# -- output ------------------------------------------------------------------------


def fmt_load(x: Any) -> str:
    return "/".join(f"{v:.2f}" for v in x) if x else "-"


def fmt_rate(x: Any) -> str:
    return f"{x:,.0f}" if isinstance(x, int | float) and not math.isnan(x) else "-"


def fmt_us(x: Any) -> str:
    return f"{x:.0f}" if isinstance(x, int | float) else "-"


def fmt_ratio(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, int | float) else "-"


def fmt_bytes(x: Any) -> str:
    if not isinstance(x, int | float):
        return "-"
    if x >= 1024 * 1024:
        return f"{x / 1024 / 1024:,.1f} MiB"
    return f"{x:,.0f} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def summary(out: dict[str, Any]) -> str:
    parts = [
        "sealstream benchmark",
        f"command: {out['command']}",
        f"machine: {out['machine']}",
        f"commit:  {out['commit']}",
        f"date:    {out['date']}   duration: {out.get('duration_s', '-')} s",
        f"load:    1/5/15-min load average {fmt_load(out.get('load_average_start'))} at the "
        f"start, {fmt_load(out.get('load_average_end'))} at the end (other processes "
        "share these cores)",
        f"setup:   {out['setup']}",
        "",
    ]
    rows = out.get("throughput", [])
    if rows:
        runs = rows[0].get("runs", 1)
        median = f", median of {runs} runs" if runs > 1 else ""
        parts.append(f"Throughput, one worker process (req/s{median})")
        body = []
        for r in rows:
            ceiling = (
                f"{fmt_ratio(r.get('drain_vs_bare'))} of bare"
                if r["alg"] == ALG_SK
                else f"{fmt_ratio(r.get('drain_vs_rsa_1_thread'))} / "
                f"{fmt_ratio(r.get('drain_vs_rsa_2_threads'))} of RSA 1T/2T"
            )
            body.append(
                [
                    f"{SHORT[r['alg']]} {size_label(r['size'])}",
                    f"{r['requests']:,}",
                    fmt_rate(r["drain_per_s"]),
                    fmt_rate(r.get("e2e_per_s")),
                    fmt_rate(r.get("bare_per_s")),
                    ceiling,
                    fmt_us(r.get("drain_cpu_us_per_req")),
                    fmt_bytes(max((x for x in r["peak_rss_bytes"] if x), default=None)),
                    ",".join(str(c) for c in r["worker_exit_codes"]),
                ]
            )
        parts.append(
            table(
                [
                    "alg / payload",
                    "requests",
                    "drain",
                    "end-to-end",
                    "bare loop",
                    "drain/ceiling",
                    "worker CPU µs/req",
                    "peak RSS",
                    "exit",
                ],
                body,
            )
        )
        parts.append(
            "  drain: pre-filled shard, timed from first read to all read and none "
            "pending; end-to-end: producer pushing while the worker runs, until "
            "every reply is in; worker CPU: the worker process's user + system time "
            "over the drain, per request (steadier than a rate on a shared machine)"
        )
        parts.append("")
    ceil = out.get("rsa_ceiling")
    if ceil:
        parts.append(
            f"RSA-2048 OAEP-SHA256 decrypts/s: {fmt_rate(ceil['threads_1_per_s'])} (1 thread), "
            f"{fmt_rate(ceil['threads_2_per_s'])} (2 threads)"
        )
        parts.append("")
    lat = out.get("latency")
    if lat:
        parts.append(
            f"Latency, SK 4 KiB, open loop at {lat[0]['fraction']:.2f} x the SK 4 KiB drain rate "
            "(ms, reply arrival - send)"
        )
        body = []
        for r in lat:
            label = (
                f"+{r['handshakes']} handshakes, pool {r.get('handshake_pool', '?')} "
                f"({r['handshakes_answered']} answered in {r['handshakes_window_s']} s)"
                if "handshakes" in r
                else "steady"
            )
            body.append(
                [
                    label,
                    fmt_rate(r["target_per_s"]),
                    f"{r['replies']:,}/{r['requests']:,}",
                    fmt_ratio(r["p50_ms"]),
                    fmt_ratio(r["p95_ms"]),
                    fmt_ratio(r["p99_ms"]),
                    fmt_ratio(r["max_ms"]),
                    " / ".join(
                        fmt_ratio(r.get(k))
                        for k in ("added_to_reply_p50_ms", "added_to_reply_p99_ms")
                    ),
                    fmt_ratio(r["producer_max_late_ms"]),
                    " / ".join(
                        fmt_us(r.get("cpu_us_per_request", {}).get(k))
                        for k in ("worker", "redis", "client")
                    ),
                ]
            )
        parts.append(
            table(
                [
                    "run",
                    "req/s",
                    "replies",
                    "p50",
                    "p95",
                    "p99",
                    "max",
                    "added->replied p50 / p99",
                    "producer late",
                    "CPU µs/req: worker / Redis / client",
                ],
                body,
            )
        )
        parts.append(
            "  added->replied: request XADD to reply XADD by Redis's clock (entry ids, 1 ms "
            "steps), without the producer's and the reply reader's own delays; producer "
            "late: the most the paced producer fell behind its schedule (ms); pool: the "
            "burst's worker's SEALSTREAM_HANDSHAKE_POOL, full when the run started; handshakes "
            "answered: replies in their streams when the run ended; CPU: the worker's, Redis's and "
            "the measuring client's (paced producer and reply reader, one hiredis connection "
            "each), per request over the run (they share the machine's cores)"
        )
        parts.append("")
    mem = next((r["redis_memory"] for r in rows if "redis_memory" in r), None)
    if mem:
        parts.append(
            "Redis memory: session record key "
            f"{fmt_bytes(mem['session_key_bytes'])}, replay record key "
            f"{fmt_bytes(mem.get('replay_record_bytes'))} (MEMORY USAGE, mean of "
            f"{mem['replay_records_sampled']}); used_memory per 1,000 replay records "
            f"{fmt_bytes(mem.get('used_memory_per_1000_replay_records'))}"
        )
        parts.append("")
    scaling = out.get("processes")
    if scaling:
        runs = scaling[0].get("runs", 1)
        median = f", median of {runs} runs" if runs > 1 else ""
        parts.append(f"Scaling (drain, req/s{median})")
        body = [
            [
                f"{SHORT[r['alg']]} {size_label(r['size'])}",
                str(r["processes"]),
                fmt_rate(r["drain_per_s"]),
                fmt_ratio(r["vs_1_process"]),
                ",".join(str(c) for c in r["worker_exit_codes"]),
            ]
            for r in scaling
        ]
        parts.append(table(["alg / payload", "processes", "drain", "vs 1 process", "exit"], body))
        parts.append("")
    peers = out.get("peers")
    if peers:
        parts.append("Peers, 1 KiB echo with AES-GCM in the job, one worker process (jobs/s)")
        body = [
            [name, fmt_rate(p.get("per_s")), str(p.get("jobs", "-")), p.get("note", "")]
            for name, p in peers.get("results", {}).items()
        ]
        parts.append(table(["peer", "jobs/s", "jobs", "note"], body))
        if peers.get("sealstream_vs_best") is not None:
            parts.append(
                f"  sealstream SK 1 KiB drain {fmt_rate(peers.get('sealstream_per_s'))} req/s = "
                f"{fmt_ratio(peers['sealstream_vs_best'])} x the best peer"
            )
        parts.append("")
    bad = out.get("failures")
    if bad:
        parts.append("FAILURES: " + "; ".join(bad))
    return "\n".join(parts)


def parse_list(choices: dict[str, Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        out = []
        for part in text.split(","):
            key = part.strip().lower()
            if key not in choices:
                raise argparse.ArgumentTypeError(f"{part!r}: choose from {', '.join(choices)}")
            out.append(choices[key])
        return out

    return parse


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=parse_list(SIZES),
        default=list(SIZES.values()),
        help="payload sizes: 256,4k,64k (default all)",
    )
    parser.add_argument(
        "--algs", type=parse_list(ALGS), default=list(ALGS.values()), help="sk,rsa (default both)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per SK measurement (default 20000; RSA: a quarter)",
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=256 * 1024 * 1024,
        help="cap on requests x payload size per measurement (default 256 MiB: 64 KiB -> 4096)",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="worker --concurrency")
    parser.add_argument(
        "--processes", type=int, default=2, help="worker processes in the scaling run (<2: skip)"
    )
    parser.add_argument("--latency-seconds", type=float, default=None, help="0: skip latency")
    parser.add_argument(
        "--latency-fraction", type=float, default=0.5, help="of the SK 4 KiB drain rate"
    )
    parser.add_argument("--handshakes", type=int, default=200, help="handshake burst size")
    parser.add_argument(
        "--handshake-pool",
        type=int,
        default=None,
        help="SEALSTREAM_HANDSHAKE_POOL of the burst's worker (default: the burst size)",
    )
    parser.add_argument("--rsa-seconds", type=float, default=None, help="RSA ceiling duration")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also run taskiq-redis, arq and SAQ (pip-installed into .venv when missing)",
    )
    parser.add_argument("--peer-jobs", type=int, default=None, help="jobs per peer (default 5000)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each throughput measurement; the median is shown (default 1)",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="only the Redis Cluster drain: one server, then 1, 2 and 3 primaries",
    )
    args = parser.parse_args()
    if args.cluster:
        import bench_cluster  # scripts/ is on sys.path: this file runs as a script

        if args.requests is None:
            args.requests = 2000 if args.quick else 10000
        result = bench_cluster.run(args)
        print(json.dumps(result, indent=2) if args.json else bench_cluster.summary(result))
        return 0
    if args.requests is None:
        args.requests = 2000 if args.quick else 20000
    if args.latency_seconds is None:
        args.latency_seconds = 3.0 if args.quick else 10.0
    if args.peer_jobs is None:
        args.peer_jobs = 1000 if args.quick else 5000
    if args.rsa_seconds is None:
        args.rsa_seconds = 0.5 if args.quick else 2.0
    if args.quick and args.handshakes == 200:
        args.handshakes = 50
    if args.handshake_pool is None:
        args.handshake_pool = args.handshakes

    started = time.monotonic()
    out: dict[str, Any] = {
        "command": " ".join(["scripts/bench", *sys.argv[1:]]),
        "machine": (
            f"{os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, "
            f"redis-server {redis_version()}"
        ),
        "commit": git_commit(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "setup": (
            f"echo handler, 20 sessions, MessagePack, worker --concurrency {args.concurrency}, "
            f"private redis-server per measurement; SK {args.requests} requests, RSA "
            f"{max(1, args.requests // 4)} (capped at {args.max_bytes // (1024 * 1024)} MiB "
            "of payload per measurement)"
        ),
    }
    progress = Progress(count_steps(args))
    try:
        anyio.run(run, args, progress, out)
    finally:
        progress.close()
        out["duration_s"] = round(time.monotonic() - started, 1)
        out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    failures: list[str] = out.setdefault("failures", [])
    for section in ("throughput", "latency", "processes"):
        for r in out.get(section, []):
            for code in r.get("worker_exit_codes", []):
                if code != 0:
                    failures.append(f"{section}: worker exit code {code}")
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(summary(out))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
