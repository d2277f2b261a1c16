"""A gateway served by uvicorn in-process on a free port, and a server-sent-event reader."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import uvicorn

from tests.helpers import wait_until
from worker.gateway import Gateway
from worker.gatewayconf import GatewaySettings
from worker.settings import Settings
from worker.testing import free_port


@asynccontextmanager
async def running_gateway(
    settings: Settings, gateway_settings: GatewaySettings | None = None
) -> AsyncIterator[tuple[str, Gateway]]:
    """Serve a gateway until the block ends; yields its base URL and the Gateway."""
    gateway = Gateway(gateway_settings or GatewaySettings(keepalive_s=0.5), settings)
    config = uvicorn.Config(
        gateway.app(),
        host="127.0.0.1",
        port=free_port(),
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    gateway.should_exit = lambda: server.should_exit
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        await wait_until(lambda: server.started, timeout=10, interval=0.01)
        try:
            yield f"http://127.0.0.1:{config.port}", gateway
        finally:
            server.should_exit = True


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event: its id and the entry's fields (decoded from base64)."""

    id: str
    fields: dict[str, bytes]


async def read_events(
    client: httpx.AsyncClient,
    url: str,
    *,
    until: Callable[[list[Event]], bool],
    last_event_id: str | None = None,
    timeout: float = 15.0,
) -> list[Event]:
    """Read events from ``url`` until ``until(events)``; then drop the connection."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    events: list[Event] = []
    with anyio.fail_after(timeout):
        async with client.stream("GET", url, headers=headers) as response:
            assert 200 == response.status_code
            assert response.headers["content-type"].startswith("text/event-stream")
            current: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line == "":
                    if "data" in current:
                        data = json.loads(current["data"])
                        fields = {k: base64.b64decode(v) for k, v in data.items()}
                        events.append(Event(id=current["id"], fields=fields))
                        if until(events):
                            return events
                    current = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    current[name] = value.removeprefix(" ")
    raise AssertionError("the event stream ended")
