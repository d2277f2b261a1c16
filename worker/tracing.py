"""OpenTelemetry tracing (the optional extra ``sealstream[otel]``): one span per
processed message, enabled by ``SEALSTREAM_OTEL=1``.

Spans follow the messaging semantic conventions: named ``process <stream>``, kind
CONSUMER, with ``messaging.system=redis``, ``messaging.operation=process``,
``messaging.message.id`` (the request's ``mid``), ``messaging.consumer.group.name``
and ``messaging.destination.name`` (the request shard). They carry no payload data:
only ids, the handler type, the reply status and error code. A span starts once
the request is authenticated and its replay record is this entry's, and ends when
its reply is queued; it is the current span while the handler (and its middleware)
runs, so spans the handler starts are its children. Disabled (the default),
OpenTelemetry is not imported and the worker pays a few ``is None`` tests per
message.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from worker.errors import ConfigError
from worker.keyspace import GROUP

T = TypeVar("T")


class Tracing:
    """Starts and ends the spans of processed messages with an OpenTelemetry tracer."""

    def __init__(self, tracer_provider: Any = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError:
            raise ConfigError(
                "SEALSTREAM_OTEL=1 needs OpenTelemetry: pip install 'sealstream[otel]'"
            ) from None
        from worker import __name__ as package

        self._trace = trace
        self._tracer = trace.get_tracer(package, tracer_provider=tracer_provider)
        self._consumer = trace.SpanKind.CONSUMER
        self._names: dict[str, str] = {}

    def start(self, stream: str, mid: str, type_: str) -> Any:
        """A started span for the message ``mid`` read from ``stream``."""
        name = self._names.get(stream)
        if name is None:
            name = self._names[stream] = f"process {stream}"
        return self._tracer.start_span(
            name,
            kind=self._consumer,
            attributes={
                "messaging.system": "redis",
                "messaging.operation": "process",
                "messaging.operation.type": "process",
                "messaging.message.id": mid,
                "messaging.consumer.group.name": GROUP,
                "messaging.destination.name": stream,
                "sealstream.type": type_,
            },
        )

    def end(self, span: Any, status: str, code: str | None) -> None:
        """End ``span`` with the reply's status (an ``error`` reply marks it failed)."""
        span.set_attribute("sealstream.status", status)
        if status != "ok":
            if code is not None:
                span.set_attribute("error.type", code)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, code))
        span.end()


def create(enabled: bool, tracer_provider: Any = None) -> Tracing | None:
    """Tracing when ``enabled`` (ConfigError if OpenTelemetry is missing), else None."""
    return Tracing(tracer_provider) if enabled else None


async def within(span: Any, call: Awaitable[T]) -> T:
    """Await ``call`` with ``span`` as the current span (its context is this task's)."""
    from opentelemetry import context, trace

    token = context.attach(trace.set_span_in_context(span))
    try:
        return await call
    finally:
        context.detach(token)
