"""OpenTelemetry spans of a real worker on a real Redis, read from the SDK's in-memory
exporter: one per processed message, named and attributed by the messaging semantic
conventions, never carrying payload data; none when tracing is off."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.helpers import open_client
from worker import App, RemoteError, Settings, Worker
from worker.testing import ThrowawayKeys

SECRET = "payload-secret-7f3a"


def _app(provider: TracerProvider | None = None) -> App:
    app = App()

    @app.handler("nested")
    async def nested(payload: Any) -> Any:
        assert provider is not None
        with provider.get_tracer("test").start_as_current_span("query the database"):
            await anyio.sleep(0.01)
        return "done"

    @app.handler("echo")
    async def echo(payload: Any) -> Any:
        return payload

    @app.handler("fail")
    async def fail(payload: Any) -> Any:
        raise RuntimeError(f"failed on {payload}")

    return app


@asynccontextmanager
async def _traced_worker(
    settings: Settings, keys: ThrowawayKeys, exporter: InMemorySpanExporter
) -> AsyncIterator[Worker]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    worker = Worker(
        _app(provider),
        settings,
        service_key=keys.service,
        master_keys=keys.master,
        tracer_provider=provider,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            yield worker
        finally:
            worker.stop()


async def _send(settings: Settings, keys: ThrowawayKeys) -> list[str]:
    """An ok request and a failing one; their mids."""
    async with (
        open_client(settings, keys) as client,
        client.session() as session,
    ):
        ok = await session.submit("echo", {"secret": SECRET}, timeout=20)
        assert {"secret": SECRET} == (await anext(session.replies())).unwrap()
        bad = await session.submit("fail", SECRET, timeout=20)
        with pytest.raises(RemoteError):
            (await anext(session.replies())).unwrap()
    return [ok, bad]


async def test_one_span_per_processed_message_by_the_messaging_conventions(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """With SEALSTREAM_OTEL on, each request gets one CONSUMER span ``process <stream>``
    with the messaging attributes; the failed one has status ERROR and its code; no
    attribute holds payload data."""
    exporter = InMemorySpanExporter()
    traced = dataclasses.replace(settings, otel=True)
    async with _traced_worker(traced, keys, exporter):
        ok, bad = await _send(traced, keys)
    stream = f"{settings.prefix}:req:{{0}}"
    spans = {(s.attributes or {})["messaging.message.id"]: s for s in exporter.get_finished_spans()}
    assert {ok, bad} == set(spans)
    for mid, span in spans.items():
        assert f"process {stream}" == span.name
        assert SpanKind.CONSUMER == span.kind
        assert {
            "messaging.system": "redis",
            "messaging.operation": "process",
            "messaging.message.id": mid,
            "messaging.consumer.group.name": "workers",
            "messaging.destination.name": stream,
        }.items() <= dict(span.attributes or {}).items()
        assert SECRET not in repr(dict(span.attributes or {}))
    assert StatusCode.UNSET == spans[ok].status.status_code
    assert StatusCode.ERROR == spans[bad].status.status_code
    assert "handler_error" == (spans[bad].attributes or {})["error.type"]


async def test_spans_a_handler_starts_are_children_of_the_message_span(
    settings: Settings, keys: ThrowawayKeys
) -> None:
    """A span the handler starts (across an await) has the message's span as parent."""
    exporter = InMemorySpanExporter()
    traced = dataclasses.replace(settings, otel=True)
    async with _traced_worker(traced, keys, exporter):
        async with (
            open_client(traced, keys) as client,
            client.session() as session,
        ):
            assert "done" == await session.request("nested", {}, timeout=20)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    child, parent = spans["query the database"], spans[f"process {traced.prefix}:req:{{0}}"]
    assert child.parent is not None and parent.context is not None
    assert parent.context.span_id == child.parent.span_id


async def test_no_spans_when_tracing_is_off(settings: Settings, keys: ThrowawayKeys) -> None:
    """Without SEALSTREAM_OTEL the worker starts no span, even with a provider given."""
    exporter = InMemorySpanExporter()
    async with _traced_worker(settings, keys, exporter) as worker:
        await _send(settings, keys)
        assert worker.processor is not None and worker.processor.tracing is None
    assert () == tuple(exporter.get_finished_spans())


def test_sealstream_otel_is_read_from_the_environment() -> None:
    """``SEALSTREAM_OTEL=1`` turns tracing on; an unclear value is a ConfigError."""
    from worker.errors import ConfigError

    assert Settings.from_env({"SEALSTREAM_OTEL": "1"}).otel
    assert not Settings.from_env({}).otel
    with pytest.raises(ConfigError):
        Settings.from_env({"SEALSTREAM_OTEL": "maybe"})
