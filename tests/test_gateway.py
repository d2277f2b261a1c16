"""The HTTP gateway: real uvicorn on a free port, real Redis, a real worker where replies matter."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as aioredis
import structlog.testing
from anyio.abc import Process

from tests.gatewayrig import Event, read_events, running_gateway
from tests.helpers import wait_until
from worker import codec, wire
from worker.cli import main
from worker.demo_app import app
from worker.envelopes import Outgoing, open_reply, seal_request
from worker.errors import ConfigError, Malformed
from worker.gateway import Gateway
from worker.gatewayconf import GatewaySettings
from worker.handshake import SessionGrant
from worker.keys import load_public_key
from worker.protocol import ALG_RSA, ALG_SK, new_id, now_ms
from worker.settings import Settings
from worker.testing import ThrowawayKeys, free_port, running_worker
from worker.trusted import create_session


def _seal(grant: SessionGrant, payload: Any, *, alg: str = ALG_SK, type_: str = "echo") -> Outgoing:
    return seal_request(
        field="j",
        alg=alg,
        sid=grant.sid,
        mid=new_id(),
        ts=now_ms(),
        type_=type_,
        plaintext=codec.dumps(payload, "j"),
        public_key=load_public_key(grant.public_key_pem) if alg == ALG_RSA else None,
        ks=grant.session_key if alg == ALG_SK else None,
    )


def _body(out: Outgoing) -> bytes:
    return wire.encode_request(out.request)["j"]


def _mid_of(event: Event) -> str | None:
    try:
        return wire.decode_reply({k.encode(): v for k, v in event.fields.items()}).mid
    except Malformed:
        return None


@pytest.fixture
async def grant(redis: aioredis.Redis, settings: Settings, keys: ThrowawayKeys) -> SessionGrant:
    """A session made through the trusted back-end path (the gateway never makes one)."""
    return await create_session(redis, keys.master, prefix=settings.prefix, ttl_s=600)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client."""
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def _publish_config(redis: aioredis.Redis, prefix: str, shards: int = 1) -> None:
    await redis.hset(
        f"{prefix}:config", mapping={"shards": shards, "servicePublicKey": "PEM", "kid": "0" * 64}
    )


async def test_config_is_the_workers(
    settings: Settings, keys: ThrowawayKeys, http: httpx.AsyncClient
) -> None:
    """GET /v1/config gives the kid, service public key and shards a worker published."""
    async with running_worker(app, settings, keys), running_gateway(settings) as (url, _):
        response = await http.get(f"{url}/v1/config")
    assert 200 == response.status_code
    expected = {"kid": keys.service.kid, "servicePublicKey": keys.service.public_pem, "shards": 1}
    assert expected == response.json()


@pytest.mark.parametrize("alg", [ALG_SK, ALG_RSA])
async def test_round_trip_through_the_gateway(
    alg: str, settings: Settings, keys: ThrowawayKeys, grant: SessionGrant, http: httpx.AsyncClient
) -> None:
    """A sealed request POSTed is answered by the worker; its reply comes as an event."""
    out = _seal(grant, {"hello": "gateway", "n": [1, 2.5]}, alg=alg)
    async with running_worker(app, settings, keys), running_gateway(settings) as (url, _):
        response = await http.post(
            f"{url}/v1/requests", content=_body(out), headers={"Content-Type": "application/json"}
        )
        assert (202, out.request.mid) == (response.status_code, response.json()["mid"])
        events = await read_events(
            http,
            f"{url}/v1/replies/{grant.sid}",
            until=lambda evs: any(_mid_of(e) == out.request.mid for e in evs),
        )
    (event,) = [e for e in events if _mid_of(e) == out.request.mid]
    reply = wire.decode_reply({b"j": event.fields["j"]})
    plaintext = open_reply(reply, reply_key=out.reply_key, request=out.request)
    body = codec.loads(plaintext, "j")
    assert ("ok", {"hello": "gateway", "n": [1, 2.5]}) == (reply.status, body)


async def test_request_goes_to_its_default_shard(
    settings: Settings, redis: aioredis.Redis, grant: SessionGrant, http: httpx.AsyncClient
) -> None:
    """The entry is added byte for byte to shard int(mid[:8], 16) % shards."""
    await _publish_config(redis, settings.prefix, shards=4)
    out = _seal(grant, {"a": 1})
    async with running_gateway(settings) as (url, _):
        response = await http.post(
            f"{url}/v1/requests", content=_body(out), headers={"Content-Type": "application/json"}
        )
    shard = int(out.request.mid[:8], 16) % 4
    entries = await redis.xrange(f"{settings.prefix}:req:{{{shard}}}")
    assert [(response.json()["id"].encode(), {b"j": _body(out)})] == entries


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda b: b[:-1], "malformed"),  # not JSON
        (lambda b: b.replace(b'"v":1,', b'"v":1,"v":1,'), "malformed"),  # duplicate key
        (lambda b: b.replace(b'"v":1,', b'"v":1,"x":0,'), "malformed"),  # unknown field
        (lambda b: b.replace(b'"v":1,', b'"v":1.0,'), "malformed"),  # integer as float
        (lambda b: b.replace(b'"iv":"', b'"iv":" '), "malformed"),  # non-canonical base64
        (lambda b: b.replace(b'"v":1,', b'"v":2,'), "unsupported"),
    ],
)
async def test_malformed_envelopes_are_refused(
    mutate: Any,
    code: str,
    settings: Settings,
    redis: aioredis.Redis,
    grant: SessionGrant,
    http: httpx.AsyncClient,
) -> None:
    """An envelope a worker would refuse is a 400 naming why, and nothing reaches Redis."""
    await _publish_config(redis, settings.prefix)
    async with running_gateway(settings) as (url, _):
        response = await http.post(
            f"{url}/v1/requests",
            content=mutate(_body(_seal(grant, {}))),
            headers={"Content-Type": "application/json"},
        )
    assert (400, code) == (response.status_code, response.json()["error"])
    assert response.json()["detail"]
    assert 0 == await redis.xlen(f"{settings.prefix}:req:{{0}}")


async def test_oversize_body_is_refused(
    settings: Settings, redis: aioredis.Redis, http: httpx.AsyncClient
) -> None:
    """A body over the limit is a 413, by its Content-Length or as it streams in."""
    await _publish_config(redis, settings.prefix)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 256

    headers = {"Content-Type": "application/json"}
    async with running_gateway(settings, GatewaySettings(max_body=1024)) as (url, _):
        declared = await http.post(f"{url}/v1/requests", content=b"{" * 2000, headers=headers)
        streamed = await http.post(f"{url}/v1/requests", content=chunks(), headers=headers)
    assert [(413, "too_large")] * 2 == [
        (r.status_code, r.json()["error"]) for r in (declared, streamed)
    ]
    assert "content-length" not in streamed.request.headers


async def test_body_must_be_json(settings: Settings, http: httpx.AsyncClient) -> None:
    """Only application/json is taken (the j encoding); anything else is a 415."""
    async with running_gateway(settings) as (url, _):
        response = await http.post(
            f"{url}/v1/requests", content=b"\x81\xa1v\x01", headers={"Content-Type": "x/msgpack"}
        )
    assert (415, "media_type") == (response.status_code, response.json()["error"])


async def test_requests_are_rate_limited_per_client(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    """Past its burst a client gets 429 with Retry-After (malformed bodies count too)."""
    headers = {"Content-Type": "application/json"}
    async with running_gateway(settings, GatewaySettings(rate=0.5, burst=2)) as (url, _):
        codes = [
            (await http.post(f"{url}/v1/requests", content=b"{}", headers=headers))
            for _ in range(3)
        ]
    assert [400, 400, 429] == [r.status_code for r in codes]
    assert "2" == codes[2].headers["retry-after"]


async def test_event_stream_opens_are_rate_limited(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    """Opening event streams spends the same tokens: a reconnect storm gets 429."""
    async with running_gateway(settings, GatewaySettings(rate=0.5, burst=1)) as (url, _):
        first = await http.post(
            f"{url}/v1/requests", content=b"{}", headers={"Content-Type": "application/json"}
        )
        stream = await http.get(f"{url}/v1/replies/{new_id()}")
    assert (400, 429, "rate_limited") == (
        first.status_code,
        stream.status_code,
        stream.json()["error"],
    )


async def test_event_streams_are_limited_per_client(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    """A client's second open event stream over its limit is a 429; the first is untouched."""
    sid = new_id()
    gateway_settings = GatewaySettings(max_streams_per_client=1, keepalive_s=0.2)
    async with (
        running_gateway(settings, gateway_settings) as (url, _),
        http.stream("GET", f"{url}/v1/replies/{sid}") as first,
    ):
        second = await http.get(f"{url}/v1/replies/{sid}")
        assert (200, 429) == (first.status_code, second.status_code)
        assert "streams_exhausted" == second.json()["error"]


async def test_dropped_stream_gives_its_slot_back(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    """When a client drops an event stream, the gateway closes it and frees its slot."""
    async with running_gateway(settings, GatewaySettings(keepalive_s=0.2)) as (url, gateway):
        async with http.stream("GET", f"{url}/v1/replies/{new_id()}") as response:
            async for _ in response.aiter_lines():
                break
            assert 1 == gateway.slots.count
        await wait_until(lambda: not gateway.slots.count, timeout=10, interval=0.05)
    assert 0 == gateway.slots.count


async def test_stream_resumes_after_a_drop_without_loss_or_repeat(
    settings: Settings,
    keys: ThrowawayKeys,
    redis: aioredis.Redis,
    grant: SessionGrant,
    http: httpx.AsyncClient,
) -> None:
    """Dropped after 2 events and resumed from Last-Event-ID: every reply exactly once."""
    headers = {"Content-Type": "application/json"}
    stream = f"{settings.prefix}:{{{grant.sid}}}:reply"
    async with running_worker(app, settings, keys), running_gateway(settings) as (url, _):

        async def send(n: int) -> None:
            for i in range(n):
                out = _seal(grant, {"i": i})
                response = await http.post(
                    f"{url}/v1/requests", content=_body(out), headers=headers
                )
                assert 202 == response.status_code

        await send(3)
        first = await read_events(
            http, f"{url}/v1/replies/{grant.sid}", until=lambda e: len(e) == 2
        )
        await send(3)

        async def six() -> bool:
            return bool(await redis.xlen(stream) >= 6)

        await wait_until(six, timeout=15, interval=0.05)
        rest = await read_events(
            http,
            f"{url}/v1/replies/{grant.sid}",
            last_event_id=first[-1].id,
            until=lambda e: len(e) == 4,
        )
    expected = [entry_id.decode() for entry_id, _ in await redis.xrange(stream)]
    assert expected == [e.id for e in first + rest]


async def test_bad_ids_are_refused(settings: Settings, http: httpx.AsyncClient) -> None:
    """A malformed session id is a 404; a malformed Last-Event-ID a 400."""
    async with running_gateway(settings) as (url, _):
        bad_sid = await http.get(f"{url}/v1/replies/{'A' * 32}")
        bad_last = await http.get(
            f"{url}/v1/replies/{new_id()}", headers={"Last-Event-ID": "0-0 x"}
        )
    assert [404, 400] == [bad_sid.status_code, bad_last.status_code]


async def test_cors_allows_only_configured_origins(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    """A preflight from an allowed origin is answered with CORS headers; others are not."""
    gateway_settings = GatewaySettings(cors_origins=("https://app.example",))
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with running_gateway(settings, gateway_settings) as (url, _):
        ok = await http.options(
            f"{url}/v1/requests", headers={"Origin": "https://app.example", **preflight}
        )
        other = await http.options(
            f"{url}/v1/requests", headers={"Origin": "https://evil.example", **preflight}
        )
    assert "https://app.example" == ok.headers.get("access-control-allow-origin")
    assert "access-control-allow-origin" not in other.headers


def test_gateway_settings_from_env() -> None:
    """SEALSTREAM_GATEWAY_* variables are read; a bad one is a ConfigError naming it."""
    settings = GatewaySettings.from_env(
        {
            "SEALSTREAM_GATEWAY_PORT": "9000",
            "SEALSTREAM_GATEWAY_RATE": "2.5",
            "SEALSTREAM_GATEWAY_CORS_ORIGINS": "https://a.example, http://b.example/",
            "SEALSTREAM_GATEWAY_DEMO": "1",
        }
    )
    assert (9000, 2.5, ("https://a.example", "http://b.example"), True) == (
        settings.port,
        settings.rate,
        settings.cors_origins,
        settings.demo,
    )
    with pytest.raises(ConfigError, match="SEALSTREAM_GATEWAY_MAX_STREAMS"):
        GatewaySettings.from_env({"SEALSTREAM_GATEWAY_MAX_STREAMS": "many"})


async def test_metrics_count_forwarded_and_refused(
    settings: Settings, redis: aioredis.Redis, grant: SessionGrant, http: httpx.AsyncClient
) -> None:
    """Prometheus counters: forwarded bytes, refusals by reason, requests by route and status."""
    await _publish_config(redis, settings.prefix)
    body = _body(_seal(grant, {"a": 1}))
    headers = {"Content-Type": "application/json"}
    async with running_gateway(settings) as (url, gateway):
        await http.post(f"{url}/v1/requests", content=body, headers=headers)
        await http.post(f"{url}/v1/requests", content=b"[]", headers=headers)
    sample = gateway.metrics.registry.get_sample_value
    assert (len(body), 1.0, 1.0, 1.0) == (
        sample("sealstream_gateway_forwarded_bytes_total"),
        sample("sealstream_gateway_refused_total", {"reason": "malformed"}),
        sample("sealstream_gateway_requests_total", {"route": "requests", "status": "202"}),
        sample("sealstream_gateway_requests_total", {"route": "requests", "status": "400"}),
    )


async def test_redis_down_is_a_503(settings: Settings, http: httpx.AsyncClient) -> None:
    """With Redis unreachable, a POST is a 503 the client may retry, not a 500."""
    down = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with running_gateway(down) as (url, _):
        config = await http.get(f"{url}/v1/config")
        response = await http.post(
            f"{url}/v1/requests",
            content=_body(_seal(_FAKE_GRANT, {})),
            headers={"Content-Type": "application/json"},
        )
    assert [(503, "redis_unavailable")] * 2 == [
        (r.status_code, r.json()["error"]) for r in (config, response)
    ]


_FAKE_GRANT = SessionGrant(sid=new_id(), public_key_pem="", session_key=b"k" * 32, expires_at=0)


def test_cli_refuses_a_bad_gateway_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sealstream gateway`` with a malformed setting is a one-line error, exit 2."""
    monkeypatch.setenv("SEALSTREAM_GATEWAY_RATE", "fast")
    assert 2 == main(["gateway"])
    assert "SEALSTREAM_GATEWAY_RATE" in capsys.readouterr().err


async def test_logs_hold_ids_and_sizes_not_envelopes(
    settings: Settings, redis: aioredis.Redis, grant: SessionGrant, http: httpx.AsyncClient
) -> None:
    """One summary line per POST, with ids, shard and size; no ciphertext, forwarded or refused."""
    await _publish_config(redis, settings.prefix)
    out = _seal(grant, {"a": 1})
    body = _body(out)
    headers = {"Content-Type": "application/json"}
    with structlog.testing.capture_logs() as logs:
        async with running_gateway(settings) as (url, _):
            await http.post(f"{url}/v1/requests", content=body, headers=headers)
            await http.post(f"{url}/v1/requests", content=body[:-1], headers=headers)
    summaries = [e for e in logs if e["event"].startswith("request_")]
    assert ["request_forwarded", "request_refused"] == [e["event"] for e in summaries]
    assert (out.request.sid, out.request.mid, len(body)) == (
        summaries[0]["session_id"],
        summaries[0]["message_id"],
        summaries[0]["size"],
    )
    text = repr(logs)
    for secret in (out.request.encrypted_data, out.request.auth_tag, out.request.iv):
        assert codec.b64encode(secret) not in text


async def test_demo_page_and_its_modules_are_served(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    """With --demo: /demo and the client's modules; no other path under /demo/js."""
    async with running_gateway(settings, GatewaySettings(demo=True)) as (url, _):
        page = await http.get(f"{url}/demo")
        module = await http.get(f"{url}/demo/js/index.js")
        outside = await http.get(f"{url}/demo/js/..%2Fpackage.json")
    assert (200, 200, 404) == (page.status_code, module.status_code, outside.status_code)
    assert "import { ALG_RSA, ALG_SK, Client, GatewayTransport }" in page.text
    assert module.headers["content-type"].startswith("text/javascript")


async def test_demo_page_needs_the_client_sources(
    settings: Settings, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Without clients/js/src (an installed wheel), /demo says so instead of a dead page."""
    gateway = Gateway(GatewaySettings(demo=True), settings, demo_js_dir=tmp_path)
    transport = httpx.ASGITransport(app=gateway.app())
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            response = await client.get("/demo")
    finally:
        await gateway.aclose()
    assert (503, "no_demo") == (response.status_code, response.json()["error"])


async def test_demo_is_off_by_default(settings: Settings, http: httpx.AsyncClient) -> None:
    """A gateway started without --demo has no /demo."""
    async with running_gateway(settings) as (url, _):
        assert 404 == (await http.get(f"{url}/demo")).status_code


@asynccontextmanager
async def _gateway_process(
    settings: Settings, tmp_path: Path, **extra_env: str
) -> AsyncIterator[tuple[Process, str]]:
    """``python -m worker gateway`` on a free port, answering HTTP; killed if still running."""
    port = free_port()
    env = {
        **os.environ,
        "SEALSTREAM_REDIS_URL": settings.redis_url,
        "SEALSTREAM_PREFIX": settings.prefix,
        "SEALSTREAM_LOG_FORMAT": "json",
        **extra_env,
    }
    command = [sys.executable, "-m", "worker", "gateway", "--port", str(port)]
    with (tmp_path / "gateway.log").open("wb") as out:
        proc = await anyio.open_process(command, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=10) as http:

            async def answers() -> bool:
                try:
                    await http.get(f"{url}/v1/config")
                except httpx.TransportError:
                    return False
                return True

            await wait_until(answers, timeout=20, interval=0.05)
        yield proc, url
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_gateway_process_serves_its_metrics(settings: Settings, tmp_path: Path) -> None:
    """With SEALSTREAM_METRICS_PORT, the gateway process serves Prometheus text there."""
    metrics_port = free_port()
    async with (
        _gateway_process(settings, tmp_path, SEALSTREAM_METRICS_PORT=str(metrics_port)),
        httpx.AsyncClient(timeout=10) as http,
    ):
        text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    assert 'sealstream_gateway_requests_total{route="config",status="503"} ' in text


async def test_sigterm_ends_open_streams_and_exits_0(settings: Settings, tmp_path: Path) -> None:
    """``sealstream gateway`` on SIGTERM closes its event streams cleanly and exits 0 at once."""
    async with (
        _gateway_process(settings, tmp_path) as (proc, url),
        httpx.AsyncClient(timeout=10) as http,
        http.stream("GET", f"{url}/v1/replies/{new_id()}") as response,
    ):
        lines = response.aiter_lines()
        assert "retry: 1000" == await anext(lines)
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            rest = [line async for line in lines]
            assert 0 == await proc.wait()
    assert all(line in ("", ": keepalive") for line in rest)
    log = (tmp_path / "gateway.log").read_text()
    assert "Traceback" not in log
    assert "replies_closed" in log
