"""OpenTelemetry tracing across the cluster, on only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

One request is one trace: the coordinator's front door opens it (an HTTP
server span, or the KServe gRPC server span), and every gRPC call it makes on
the request's behalf (DecodeWorker/Allocate, PrefillWorker/Prefill,
DecodeWorker/Decode, ...) is a client span whose W3C trace context travels in
the gRPC metadata (`traceparent`), so the worker's server span joins the same
tree in another process. Spans go to the OTLP/gRPC endpoint the standard
`OTEL_EXPORTER_OTLP_*` variables name, in batches.

Off (the variable unset), nothing is imported or installed: no interceptor on
any channel or server, no middleware, so tracing costs nothing.

Registration heartbeats and health checks are left out: they are not part of
any request, and would otherwise fill the backend with one trace per second
per worker.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
UNTRACED_PATHS = ("/metrics", "/health", "/v2/health/live", "/v2/health/ready", "/cluster")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def is_enabled() -> bool:
    return bool(os.environ.get(ENDPOINT_VARIABLE))


def setup(service_name: str) -> bool:
    """Export this process's spans as `service_name` and trace its gRPC servers and channels.

    Call it before the process creates any grpc.aio server or channel. Returns
    whether tracing is on.
    """
    if not is_enabled():
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
        filters,
    )
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    registry = filters.service_name("disagg.control.Registry")
    untraced = filters.any_of(registry, filters.health_check())
    GrpcAioInstrumentorServer(filter_=filters.negate(untraced)).instrument()
    GrpcAioInstrumentorClient(filter_=filters.negate(untraced)).instrument()
    return True


def traced_asgi(app: ASGIApp) -> ASGIApp:
    """`app` with a server span per HTTP request (joining an incoming `traceparent`), or
    `app` itself when tracing is off."""
    if not is_enabled():
        return app
    from opentelemetry import propagate, trace

    tracer = trace.get_tracer("disagg.frontdoor")

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

            async def send_traced(message: dict) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                await send(message)

            await app(scope, receive, send_traced)

    return traced
