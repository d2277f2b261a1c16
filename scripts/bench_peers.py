"""Peers for ``scripts/bench.py --peers``: one job, three task queues.

The job is sealstream's echo work at 1 KiB with AES-GCM inside it: decrypt the
payload with a key the producer and the worker share, encrypt the result with a
fresh nonce, return it. Each peer gets its own small functions: ``fill_*`` pushes
the jobs before any worker runs, and its worker is the library's own CLI pointed at
an object of this module (built on first use, so a peer that is not installed
only fails its own run):

- taskiq-redis: ``taskiq worker bench_peers:taskiq_broker`` (Redis Streams broker,
  consumer group read from id 0, Redis result backend);
- arq: ``arq bench_peers.ArqSettings`` (``max_jobs`` as sealstream's concurrency,
  ``poll_delay`` 0: the default 0.5 s between polls caps a fast job's rate);
- SAQ: ``saq bench_peers.saq_settings``.

Settings come from the environment: ``BENCH_REDIS_URL``, ``BENCH_KEY`` (hex),
``BENCH_JOBS``, ``BENCH_CONCURRENCY``, ``BENCH_OUT`` (a JSON file with the wall-clock
times of the first job's start and the last job's end, written by the job that
completes the count), and ``BENCH_PEER``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_state: dict[str, Any] = {"first": None, "count": 0}
_cache: dict[str, Any] = {}


def _env(name: str) -> str:
    return os.environ[name]


def _aead() -> AESGCM:
    if "aead" not in _cache:
        _cache["aead"] = AESGCM(bytes.fromhex(_env("BENCH_KEY")))
    return _cache["aead"]  # type: ignore[no-any-return]


def seal(plaintext: bytes, aead: AESGCM) -> str:
    nonce = os.urandom(12)
    return base64.b64encode(nonce + aead.encrypt(nonce, plaintext, None)).decode()


def work(data: str) -> str:
    """The job: AES-GCM open the 1 KiB payload, seal it back (an echo)."""
    if _state["first"] is None:
        _state["first"] = time.time()
    raw = base64.b64decode(data)
    aead = _aead()
    result = seal(aead.decrypt(raw[:12], raw[12:], None), aead)
    _state["count"] += 1
    if _state["count"] == int(_env("BENCH_JOBS")):
        out = {"first": _state["first"], "last": time.time(), "jobs": _state["count"]}
        Path(_env("BENCH_OUT")).write_text(json.dumps(out))
    return result


def payloads(n: int, size: int) -> list[str]:
    aead = AESGCM(bytes.fromhex(_env("BENCH_KEY")))
    body = os.urandom(size)
    return [seal(body, aead) for _ in range(n)]


async def _in_chunks(calls: list[Callable[[], Awaitable[Any]]], chunk: int = 100) -> None:
    for start in range(0, len(calls), chunk):
        await asyncio.gather(*(c() for c in calls[start : start + chunk]))


# -- taskiq-redis ------------------------------------------------------------------------


def _taskiq() -> tuple[Any, Any]:
    if "taskiq" not in _cache:
        from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

        url = _env("BENCH_REDIS_URL")
        broker = RedisStreamBroker(url, consumer_id="0").with_result_backend(
            RedisAsyncResultBackend(url, result_ex_time=3600)
        )

        @broker.task(task_name="echo")
        async def echo(data: str) -> str:
            return work(data)

        _cache["taskiq"] = (broker, echo)
    return _cache["taskiq"]  # type: ignore[no-any-return]


async def fill_taskiq(items: list[str]) -> None:
    broker, echo = _taskiq()
    await broker.startup()
    try:
        await _in_chunks([partial(echo.kiq, d) for d in items])
    finally:
        await broker.shutdown()


def taskiq_command(concurrency: int) -> list[str]:
    return [
        *_bin("taskiq"),
        "worker",
        "bench_peers:taskiq_broker",
        "--workers",
        "1",
        "--max-async-tasks",
        str(concurrency),
        "--log-level",
        "WARNING",
    ]


# -- arq -------------------------------------------------------------------------------


async def _arq_echo(ctx: dict[str, Any], data: str) -> str:
    return work(data)


async def _arq_quiet(ctx: dict[str, Any]) -> None:
    # The CLI logs every job at INFO; the sealstream worker runs at warning.
    logging.getLogger("arq").setLevel(logging.WARNING)


def _arq_settings() -> type:
    from arq.connections import RedisSettings

    class ArqSettings:
        functions = (_arq_echo,)
        redis_settings = RedisSettings.from_dsn(_env("BENCH_REDIS_URL"))
        max_jobs = int(os.environ.get("BENCH_CONCURRENCY", "64"))
        poll_delay = 0.0
        on_startup = _arq_quiet

    return ArqSettings


async def fill_arq(items: list[str]) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(_env("BENCH_REDIS_URL")))
    try:
        await _in_chunks([partial(pool.enqueue_job, "_arq_echo", d) for d in items])
    finally:
        await pool.aclose()


def arq_command(concurrency: int) -> list[str]:
    return [*_bin("arq"), "bench_peers.ArqSettings"]


# -- SAQ -------------------------------------------------------------------------------


async def _saq_echo(ctx: dict[str, Any], *, data: str) -> str:
    return work(data)


def saq_settings() -> dict[str, Any]:
    from saq import Queue

    return {
        "queue": Queue.from_url(_env("BENCH_REDIS_URL")),
        "functions": [("echo", _saq_echo)],
        "concurrency": int(os.environ.get("BENCH_CONCURRENCY", "64")),
    }


async def fill_saq(items: list[str]) -> None:
    from saq import Queue

    queue = Queue.from_url(_env("BENCH_REDIS_URL"))
    await queue.connect()
    try:
        await _in_chunks([partial(queue.enqueue, "echo", data=d) for d in items])
    finally:
        await queue.disconnect()


def saq_command(concurrency: int) -> list[str]:
    return [*_bin("saq"), "bench_peers.saq_settings", "--quiet"]


# -- plumbing --------------------------------------------------------------------------

FILL: dict[str, Callable[[list[str]], Coroutine[Any, Any, None]]] = {
    "taskiq-redis": fill_taskiq,
    "arq": fill_arq,
    "saq": fill_saq,
}
COMMAND: dict[str, Callable[[int], list[str]]] = {
    "taskiq-redis": taskiq_command,
    "arq": arq_command,
    "saq": saq_command,
}


def _bin(name: str) -> list[str]:
    return [str(Path(sys.executable).with_name(name))]


def __getattr__(name: str) -> Any:
    if name == "taskiq_broker":
        return _taskiq()[0]
    if name == "ArqSettings":
        return _arq_settings()
    raise AttributeError(name)


if __name__ == "__main__":
    # python scripts/bench_peers.py fill PEER N SIZE
    _, _, peer, n, size = sys.argv
    asyncio.run(FILL[peer](payloads(int(n), int(size))))
