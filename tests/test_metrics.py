"""Prometheus metrics: what a worker counts, served over HTTP."""

from __future__ import annotations

import urllib.request
from dataclasses import replace

import anyio
import pytest
import redis.asyncio as aioredis

from tests.helpers import Raw
from worker.demo_app import app
from worker.errors import ConfigError
from worker.metrics import Metrics, serve
from worker.settings import Settings
from worker.testing import ThrowawayKeys, free_port, running_worker


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_worker_serves_its_counts(
    settings: Settings, keys: ThrowawayKeys, redis: aioredis.Redis
) -> None:
    """Answered, failed and refused requests are counted and served at /metrics."""
    port = free_port()
    raw = Raw(redis, settings.prefix, keys)
    grant = await raw.grant()
    async with running_worker(app, replace(settings, metrics_port=port), keys):
        for type_ in ("echo", "echo", "fail", "nope"):
            out = raw.seal(grant, {}, type_=type_)
            await raw.send(out.request)
            await raw.reply(grant.sid, out.request.mid)
        await raw.send_fields({"x": b"garbage"})
        await raw.wait_dead_letters(2)  # fail's handler_error, then the garbage
        await raw.wait_drained()
        text = await anyio.to_thread.run_sync(_scrape, port)
    assert 'sealstream_requests_total{status="ok",type="echo"} 2.0' in text
    assert 'sealstream_requests_total{status="error",type="fail"} 1.0' in text
    assert 'sealstream_requests_total{status="error",type="unknown"} 1.0' in text
    assert 'sealstream_refused_total{reason="malformed"} 1.0' in text
    assert 'sealstream_handler_seconds_count{type="echo"} 2.0' in text
    assert "sealstream_in_flight 0.0" in text


async def test_metrics_port_in_use_is_a_config_error() -> None:
    """A port that cannot be bound is a ConfigError naming the setting."""
    first = serve(Metrics(), port=0, addr="127.0.0.1")
    try:
        with pytest.raises(ConfigError, match="SEALSTREAM_METRICS_PORT"):
            serve(Metrics(), port=first.port, addr="127.0.0.1")
    finally:
        first.close()


def test_metrics_port_from_environment() -> None:
    """SEALSTREAM_METRICS_PORT and _ADDR configure the exporter; unset means off."""
    assert Settings.from_env({}).metrics_port is None
    s = Settings.from_env({"SEALSTREAM_METRICS_PORT": "9400", "SEALSTREAM_METRICS_ADDR": "0.0.0.0"})
    assert (9400, "0.0.0.0") == (s.metrics_port, s.metrics_addr)
