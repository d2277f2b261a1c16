"""The built-in demo app (``echo``, ``sleep``, ``fail``) and the demo producer."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio

from worker.client import Client, ClientSession
from worker.codec import Field
from worker.errors import BadPayload, RemoteError
from worker.handlers import App
from worker.handshake import SessionGrant
from worker.protocol import ALG_RSA, ALG_SK

app = App()


@app.handler("echo")
async def echo(payload: Any) -> Any:
    """Return the payload unchanged."""
    return payload


@app.handler("sleep")
async def sleep(payload: Any) -> dict[str, int]:
    """``{"ms": n}`` -> ``{"slept": n}`` after n milliseconds (0..60000)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("ms"), int):
        raise BadPayload('expected {"ms": <integer>}')
    ms = payload["ms"]
    if not 0 <= ms <= 60_000:
        raise BadPayload("ms must be between 0 and 60000")
    await anyio.sleep(ms / 1000)
    return {"slept": ms}


class DemoFailure(RuntimeError):
    """What ``fail`` raises."""


@app.handler("fail")
async def fail(payload: Any) -> Any:
    """Always raises (to show error replies and dead letters)."""
    raise DemoFailure("this handler always fails")


async def produce(
    client: Client, *, sessions: int, jobs: int, concurrency: int = 64
) -> dict[str, Any]:
    """Send ``jobs`` echo/sleep/fail requests over ``sessions`` sessions, both algs."""
    outcomes: Counter[str] = Counter()
    samples: dict[str, Any] = {}
    mismatches = 0
    limiter = anyio.Semaphore(concurrency)
    started = time.perf_counter()
    async with _open_sessions(client, sessions) as opened:
        handshake_s = time.perf_counter() - started
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            nonlocal mismatches
            session = opened[i % len(opened)]
            alg = ALG_RSA if i % 2 else ALG_SK
            encoding: Field = "j" if i % 3 == 0 else "e"
            async with limiter:
                try:
                    if i % 50 == 49:
                        await session.request("fail", {}, alg=alg, encoding=encoding)
                    elif i % 10 == 9:
                        out = await session.request("sleep", {"ms": 5}, alg=alg, encoding=encoding)
                        mismatches += out != {"slept": 5}
                        samples.setdefault(f"sleep via {alg}", out)
                    else:
                        payload = {"job": i, "text": f"hello {i}", "alg": alg}
                        out = await session.request("echo", payload, alg=alg, encoding=encoding)
                        mismatches += out != payload
                        samples.setdefault(f"echo via {alg}", out)
                    outcomes[f"ok {alg}"] += 1
                except RemoteError as exc:
                    outcomes[f"error {exc.code}"] += 1
                    samples.setdefault("fail", f"{exc.code}: {exc.remote_message}")

        async with anyio.create_task_group() as tg:
            for i in range(jobs):
                tg.start_soon(one, i)
        elapsed = time.perf_counter() - t0
    return {
        "sessions": sessions,
        "jobs": jobs,
        "handshakes_s": round(handshake_s, 3),
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(jobs / elapsed, 1),
        "outcomes": dict(sorted(outcomes.items())),
        "mismatches": mismatches,
        "sample_decrypted_replies": samples,
    }


@contextlib.asynccontextmanager
async def _open_sessions(client: Client, n: int) -> AsyncIterator[list[ClientSession]]:
    """Handshake ``n`` sessions concurrently and keep them open."""
    grants: list[SessionGrant] = []

    async def shake() -> None:
        grants.append(await client.handshake())

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(shake)
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(client.session(g)) for g in grants]
