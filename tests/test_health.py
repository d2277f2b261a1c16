"""/healthz and /readyz beside /metrics: alive, and consuming from Redis."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import replace

import anyio

from tests.helpers import wait_until
from worker.demo_app import app
from worker.health import Readiness
from worker.settings import Settings
from worker.testing import RedisServer, ThrowawayKeys, free_port, running_worker


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), str(response.read().decode())
    except urllib.error.HTTPError as exc:
        return int(exc.code), str(exc.read().decode())


async def _wait_status(port: int, path: str, status: int, timeout: float = 15.0) -> None:
    async def answered() -> bool:
        return (await anyio.to_thread.run_sync(_get, port, path))[0] == status

    await wait_until(answered, timeout=timeout, interval=0.05)


async def test_ready_while_consuming_not_ready_when_redis_is_gone(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """A running worker answers /healthz 200 and /readyz 200; with its Redis stopped,
    /readyz turns 503 once no read has completed within the window, /healthz stays 200."""
    port = free_port()
    server = RedisServer.launch()
    try:
        s = replace(settings, redis_url=server.url, metrics_port=port)
        async with running_worker(app, s, keys) as worker:
            worker.health.window_s = 1.0
            await _wait_status(port, "/readyz", 200)
            assert (200, "ok\n") == await anyio.to_thread.run_sync(_get, port, "/healthz")
            server.stop()
            await _wait_status(port, "/readyz", 503)
            assert 200 == (await anyio.to_thread.run_sync(_get, port, "/healthz"))[0]
            metrics = (await anyio.to_thread.run_sync(_get, port, "/metrics"))[1]
            assert "sealstream_last_read_timestamp_seconds" in metrics
            worker.stop()  # Redis is gone: stop at once rather than after the grace
    finally:
        server.stop()


async def test_not_ready_once_stopping(settings: Settings, keys: ThrowawayKeys) -> None:
    """A worker asked to stop reports not ready at once, while it drains."""
    port = free_port()
    async with running_worker(app, replace(settings, metrics_port=port), keys) as worker:
        await _wait_status(port, "/readyz", 200)
        worker.stop()
        assert 503 == (await anyio.to_thread.run_sync(_get, port, "/readyz"))[0]


def test_readiness_window_and_throttled_publish() -> None:
    """Ready only after a read and within the window; on_read runs at most once a second."""
    now = [100.0]
    published: list[float] = []
    r = Readiness(window_s=5.0, on_read=lambda: published.append(now[0]), clock=lambda: now[0])
    assert not r.ready()
    r.read_completed()
    now[0] += 0.5
    r.read_completed()
    assert r.ready()
    now[0] += 5.6
    assert not r.ready()
    r.read_completed()
    assert r.ready()
    assert [100.0, 106.1] == published
