"""OpenTelemetry tracing across the cluster, on only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

One request is one trace: the coordinator's front door opens it (an HTTP
server span, or the KServe gRPC server span), and every gRPC call it makes on
the request's behalf (DecodeWorker/Allocate, PrefillWorker/Prefill,
DecodeWorker/Decode, ...) is a client span whose W3C trace context travels in
the gRPC metadata (`traceparent`), so the worker's server span joins the same
tree in another process. Spans go to the OTLP/gRPC endpoint the standard
`OTEL_EXPORTER_OTLP_*` variables name, in batches.

Inside the RPCs, finer spans say where the time went:

    POST /v1/completions                          coordinator (front door)
    ├── admission                                 coordinator: queued for KV room, allocated
    │   └── DecodeWorker/Allocate (client, server)
    │       └── kv.receive                        decode worker: first layer in .. READY
    ├── PrefillWorker/Prefill (client, server)
    │   ├── prefill.queue                         prefill worker: waiting for the engine
    │   ├── prefill.forward                       the prompt's forward (layers ship as done)
    │   └── kv.send                               first layer out .. every frame out
    └── DecodeWorker/Decode (client, server)      one `decode.step` event per step the
                                                  sequence was in, with the step's batch size

A migration (coordinator/migration.py) is an event on the front door's span,
and the sequence's next attempt opens a new `admission` span beside the first.
Work timed on an engine thread is recorded afterwards from its timings
(`record_span`), so no span is opened on the engine's hot path.

Off (the variable unset), nothing is imported or installed: no interceptor on
any channel or server, no middleware, and the calls below return at once
(`span` a shared no-op, `current_span` and `current_context` None), so tracing
costs nothing.

Registration heartbeats and health checks are left out: they are not part of
any request, and would otherwise fill the backend with one trace per second
per worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
UNTRACED_PATHS = ("/metrics", "/health", "/v2/health/live", "/v2/health/ready", "/cluster")
TRACER_NAME = "disagg"

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]
Attributes = Mapping[str, str | int | float | bool]

_provider: Any = None
"""The TracerProvider this process traces with; None while tracing is off."""
_instrumentors: list[Any] = []


class _NoSpan:
    """What `span` yields while tracing is off: every call does nothing."""

    def set_attribute(self, key: str, value: object) -> None: ...

    def add_event(self, name: str, attributes: Attributes | None = None, **_: object) -> None: ...


NO_SPAN = _NoSpan()


def is_enabled() -> bool:
    """Whether the environment asks for tracing (an OTLP endpoint is set)."""
    return bool(os.environ.get(ENDPOINT_VARIABLE))


def is_active() -> bool:
    """Whether this process traces now (`setup` or `install` ran)."""
    return _provider is not None


def setup(service_name: str) -> bool:
    """Export this process's spans as `service_name` and trace its gRPC servers and channels.

    Call it before the process creates any grpc.aio server or channel. Returns
    whether tracing is on (also when it was already installed in this process).
    """
    if is_active():
        return True
    if not is_enabled():
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    install(provider)
    return True


def install(provider: Any) -> None:
    """Trace with `provider` (an opentelemetry TracerProvider): gRPC servers and channels
    created from now on, the front door, and disagg's own spans. `setup` calls it; a test
    installs a provider with an in-memory exporter, and `uninstall`s it afterwards."""
    global _provider
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
        filters,
    )

    registry = filters.service_name("disagg.control.Registry")
    untraced = filters.negate(filters.any_of(registry, filters.health_check()))
    for instrumentor in (GrpcAioInstrumentorServer, GrpcAioInstrumentorClient):
        _instrumentors.append(instrumentor(filter_=untraced))
        _instrumentors[-1].instrument(tracer_provider=provider)
    _provider = provider


def uninstall() -> None:
    """Stop tracing in this process: servers and channels made from now on are plain."""
    global _provider
    while _instrumentors:
        _instrumentors.pop().uninstrument()
    _provider = None


def span(name: str, **attributes: str | int | float | bool) -> AbstractContextManager[Any]:
    """A child span of the current one, current inside the `with`; NO_SPAN when off."""
    if _provider is None:
        return nullcontext(NO_SPAN)
    return _provider.get_tracer(TRACER_NAME).start_as_current_span(name, attributes=attributes)


def current_span() -> Any:
    """The span of the code running now, or None when tracing is off."""
    if _provider is None:
        return None
    from opentelemetry import trace

    return trace.get_current_span()


def current_context() -> Any:
    """The trace context of the code running now (to parent work done on another thread),
    or None when tracing is off."""
    if _provider is None:
        return None
    from opentelemetry import context

    return context.get_current()


def record_span(
    name: str,
    start_unix_ns: int,
    end_unix_ns: int,
    attributes: Attributes | None = None,
    parent: Any = None,
) -> None:
    """A span for work that already happened (timed on another thread), as a child of
    `parent` (a context from `current_context`), or of the current span when None."""
    if _provider is None:
        return
    tracer = _provider.get_tracer(TRACER_NAME)
    started = tracer.start_span(
        name, context=parent, attributes=attributes, start_time=start_unix_ns
    )
    started.end(end_time=end_unix_ns)


def traced_asgi(app: ASGIApp) -> ASGIApp:
    """`app` with a server span per HTTP request (joining an incoming `traceparent`), or
    `app` itself when tracing is off."""
    if not is_active():
        return app
    from opentelemetry import propagate, trace

    tracer = _provider.get_tracer("disagg.frontdoor")

    async def traced(scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            return await app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        name = f"{scope['method']} {scope['path']}"
        attributes = {"http.request.method": scope["method"], "url.path": scope["path"]}
        with tracer.start_as_current_span(
            name, context=propagate.extract(headers), kind=trace.SpanKind.SERVER,
            attributes=attributes,
        ) as span:  # fmt: skip
            response = _ResponseStream()

            async def send_traced(message: dict) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                await send(message)
                response.sent(message)

            await app(scope, receive, send_traced)
            response.record()

    return traced


class _ResponseStream:
    """The `response.stream` span: from the response's headers to its last body chunk
    reaching the client's socket (for a streamed completion, every token), in chunks."""

    def __init__(self) -> None:
        self.start_unix_ns = 0
        self.end_unix_ns = 0
        self.num_chunks = 0

    def sent(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.start_unix_ns = time.time_ns()
        elif message["type"] == "http.response.body":
            self.num_chunks += 1
            self.end_unix_ns = time.time_ns()

    def record(self) -> None:
        if self.start_unix_ns and self.end_unix_ns:
            attributes = {"num_chunks": self.num_chunks}
            record_span("response.stream", self.start_unix_ns, self.end_unix_ns, attributes)
