"""The finer spans inside one request's trace, on the in-process cluster with an in-memory
exporter: admission in the coordinator, the prefill's queue, forward and KV send, the decode
worker's KV receive, and one `decode.step` event per step on the Decode span, all in one
tree under the front door's span, each phase under the RPC it belongs to.

The cluster here is its own (tracing must be installed before its servers and channels
exist), and tracing is uninstalled afterwards, so no other test is traced.
"""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.cluster_harness import wait_until
from tests.helpers import recorded_spans
from tests.inprocess_cluster import InProcessCluster

CLIENT_SPAN_ID = "00f067aa0ba902b7"
MAX_TOKENS = 8
RPC = "/disagg.control.{}"


@pytest.fixture(scope="module")
def traced(tiny_model_dir):
    with recorded_spans() as exporter, InProcessCluster(tiny_model_dir) as cluster:
        yield cluster, exporter


def complete(url: str, trace_id: str, prompt: str, stream: bool = False) -> dict | str:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    body["stream"] = stream
    request = urllib.request.Request(
        f"{url}/v1/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "traceparent": f"00-{trace_id}-{CLIENT_SPAN_ID}-01"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read().decode() if stream else json.load(response)


class Tree:
    """One trace's spans, found by name and kind, each with its parent."""

    def __init__(self, spans: list[ReadableSpan]) -> None:
        self.spans = spans
        self.by_id = {s.context.span_id: s for s in spans}

    def parent(self, span: ReadableSpan) -> ReadableSpan | None:
        return self.by_id.get(span.parent.span_id) if span.parent else None

    def roots(self) -> list[ReadableSpan]:
        return [s for s in self.spans if self.parent(s) is None]

    def one(self, name: str, kind: SpanKind | None = None) -> ReadableSpan:
        found = [s for s in self.spans if s.name == name and kind in (None, s.kind)]
        assert len(found) == 1, f"{len(found)} spans {name} ({kind}): {self.names()}"
        return found[0]

    def names(self) -> list[str]:
        return sorted(f"{s.name}:{s.kind.name}" for s in self.spans)

    def is_complete(self) -> bool:
        # NOTE: the Decode server span ends after the client has its last token
        return any(s.name == RPC.format("DecodeWorker/Decode") and s.kind == SpanKind.SERVER
                   for s in self.spans) and len(self.roots()) == 1  # fmt: skip


def tree_of(exporter: InMemorySpanExporter, trace_id: str) -> Tree:
    def whole() -> Tree | None:
        spans = [
            s for s in exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id
        ]
        tree = Tree(spans)
        return tree if tree.is_complete() else None

    return wait_until(whole, 30, f"the spans of trace {trace_id}")


def rpc_pair(tree: Tree, method: str) -> tuple[ReadableSpan, ReadableSpan]:
    """The coordinator's client span for `method` and the worker's server span under it."""
    client = tree.one(RPC.format(method), SpanKind.CLIENT)
    server = tree.one(RPC.format(method), SpanKind.SERVER)
    assert tree.parent(server) is client, f"{method}: the server span joins the client's"
    return client, server


def is_within(inner: ReadableSpan, outer: ReadableSpan) -> bool:
    return outer.start_time <= inner.start_time <= inner.end_time <= outer.end_time


def step_events(tree: Tree) -> list[tuple[int, int]]:
    _, decode = rpc_pair(tree, "DecodeWorker/Decode")
    events = [e for e in decode.events if e.name == "decode.step"]
    return [(e.attributes["step"], e.attributes["batch_size"]) for e in events]


def test_one_request_is_one_tree_with_every_phase_under_its_rpc(traced):
    cluster, exporter = traced
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    reply = complete(cluster.url, trace_id, "The capital of France is")
    assert reply["usage"]["completion_tokens"] == MAX_TOKENS
    tree = tree_of(exporter, trace_id)

    (root,) = tree.roots()
    assert root.name == "POST /v1/completions" and f"{root.parent.span_id:016x}" == CLIENT_SPAN_ID

    admission = tree.one("admission")
    assert tree.parent(admission) is root
    assert admission.attributes["queue_s"] >= 0 and admission.attributes["decode_worker"]
    allocate, allocated = rpc_pair(tree, "DecodeWorker/Allocate")
    assert tree.parent(allocate) is admission, "Allocate is part of admission"

    prefill, prefilled = rpc_pair(tree, "PrefillWorker/Prefill")
    assert tree.parent(prefill) is root
    for name in ("prefill.queue", "prefill.forward", "kv.send"):
        phase = tree.one(name)
        assert tree.parent(phase) is prefilled and is_within(phase, prefilled), name
    forward, send = tree.one("prefill.forward"), tree.one("kv.send")
    assert tree.one("prefill.queue").end_time <= forward.start_time
    assert send.start_time >= forward.start_time and send.end_time >= forward.end_time
    assert send.attributes["kv_bytes"] > 0

    received = tree.one("kv.receive")
    assert tree.parent(received) is allocated, "the KV arrives for the handle Allocate made"
    assert received.attributes["kv_bytes"] == send.attributes["kv_bytes"]
    assert "failure" not in received.attributes

    decode, _ = rpc_pair(tree, "DecodeWorker/Decode")
    assert tree.parent(decode) is root
    steps = step_events(tree)
    assert len(steps) == MAX_TOKENS - 1, "one event per decode step (the first token: prefill)"
    assert [batch for _, batch in steps] == [1] * len(steps), "alone in every step"
    assert [s for s, _ in steps] == sorted({s for s, _ in steps}), "distinct steps, in order"
    assert not [s for s in tree.spans if s.name.startswith("decode.")], "events, not spans"
    response = tree.one("response.stream")
    assert tree.parent(response) is root and is_within(response, root)


def test_concurrent_requests_are_separate_trees_and_steps_count_the_batch(traced):
    cluster, exporter = traced
    trace_ids = ["0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331b7ad6b7169203331"]
    prompts = ["def fibonacci(n):", "Photosynthesis is the process by which"]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda args: complete(cluster.url, *args), zip(trace_ids, prompts)))
    first, second = (dict(step_events(tree_of(exporter, t))) for t in trace_ids)
    shared = first.keys() & second.keys()
    for steps in (first, second):
        for step, batch_size in steps.items():
            assert batch_size == (2 if step in shared else 1), (step, first, second)
    cluster.wait_all_blocks_free()


def test_a_streamed_response_is_one_span_spanning_every_chunk_to_the_client(traced):
    cluster, exporter = traced
    trace_id = "5cf92f3577b34da6a3ce929d0e0e4737"
    events = complete(cluster.url, trace_id, "Streams carry", stream=True)
    num_events = events.count("data: ")
    assert num_events >= 3 and events.rstrip().endswith("data: [DONE]")
    tree = tree_of(exporter, trace_id)
    (root,) = tree.roots()
    response = tree.one("response.stream")
    assert tree.parent(response) is root and is_within(response, root)
    assert response.attributes["num_chunks"] >= num_events
    _, decode = rpc_pair(tree, "DecodeWorker/Decode")
    assert response.start_time <= decode.end_time <= response.end_time, "tokens stream out"
