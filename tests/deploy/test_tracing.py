"""One request's spans form one tree across the coordinator and both workers, exported over
OTLP, with the finer phase spans in the process that ran each phase; off by default."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.cluster_harness import ServeProcess

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
DEADLINE_S = 60.0


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                with self._lock:
                    self.spans += [
                        Span(
                            attributes["service.name"],
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                        )  # fmt: skip
                        for s in scope_spans.spans
                    ]
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture
def collector():
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def test_tracing_off_imports_and_installs_nothing():
    code = (
        "import sys, disagg.tracing as t\n"
        "app = object()\n"
        "assert not t.setup('x') and t.traced_asgi(app) is app\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


def orphans(spans: list[Span]) -> list[Span]:
    """Spans whose parent is not in `spans`: only the root, once the whole tree is in."""
    ids = {s.span_id for s in spans}
    return [s for s in spans if s.parent_id not in ids]


def wait_for_tree(collector: Collector, services: set[str]) -> list[Span]:
    """The request's spans, once every service has sent its part and each parent is there."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        spans = collector.trace(TRACE_ID)
        if services <= {s.service for s in spans} and len(orphans(spans)) == 1:
            return spans
        assert time.monotonic() < deadline, f"no single tree in time: {spans}"
        time.sleep(0.2)


@pytest.mark.slow
def test_one_request_is_one_trace_across_three_processes(collector, monkeypatch):
    servicer, port = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    with ServeProcess() as serve:
        request = urllib.request.Request(
            f"{serve.url}/v1/completions",
            b'{"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}',
            {"Content-Type": "application/json",
             "traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
        services = {"disagg-coordinator", "disagg-prefill-worker", "disagg-decode-worker"}
        spans = wait_for_tree(servicer, services)
    (root,) = orphans(spans)
    assert root.parent_id == CLIENT_SPAN_ID, "the front door joins the caller's trace"
    assert root.service == "disagg-coordinator" and root.name == "POST /v1/completions"
    names = {(s.service, s.name) for s in spans}
    for worker, rpc in [("decode", "DecodeWorker/Allocate"), ("prefill", "PrefillWorker/Prefill"),
                        ("decode", "DecodeWorker/Decode")]:  # fmt: skip
        name = f"/disagg.control.{rpc}"
        assert ("disagg-coordinator", name) in names, f"no client span for {rpc}"
        assert (f"disagg-{worker}-worker", name) in names, f"no server span for {rpc}"
    for service, phase in [("coordinator", "admission"), ("prefill-worker", "prefill.forward"),
                           ("prefill-worker", "kv.send"), ("decode-worker", "kv.receive")]:  # fmt: skip
        assert (f"disagg-{service}", phase) in names, f"no {phase} span in disagg-{service}"
    assert not [s for s in servicer.spans if "Registry" in s.name or "Health" in s.name]
