"""The real client against the loopback SSE server: one case per error class and chunk shape."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from bench.serving.client import RequestOptions, request_body, send
from bench.serving.record import RequestRecord
from bench.serving.runner import parse_target, with_extra_bodies
from bench.serving.workload import WorkloadRequest
from tests.bench.conftest import FIRST_TOKEN_DELAY_S

REQUEST = WorkloadRequest(0, "one two three", 3, 12)


def call(url: str, api: str = "completions", timeout_s: float = 5.0) -> RequestRecord:
    options = RequestOptions("loopback", api, timeout_s=timeout_s)
    body = request_body(REQUEST, options)
    endpoint = url + ("/v1/chat/completions" if api == "chat" else "/v1/completions")

    async def go() -> RequestRecord:
        async with httpx.AsyncClient() as client:
            record = RequestRecord(0, REQUEST.input_len, REQUEST.output_len)
            return await send(client, endpoint, body, record, 0, timeout_s)

    return asyncio.run(go())


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_a_normal_stream(loopback, api):
    record = call(loopback.url("ok"), api)
    assert record.error is None, record.error_detail
    assert record.chunk_tokens == [1] * 12 and record.completion_tokens == 12
    assert record.chunk_ns[0] - record.sent_ns >= FIRST_TOKEN_DELAY_S * 1e9
    assert record.chunk_ns == sorted(record.chunk_ns) and record.end_ns >= record.chunk_ns[-1]


def test_multi_token_chunks_counted_then_corrected_by_usage(loopback):
    record = call(loopback.url("chunk5"))
    assert record.chunk_tokens == [1, 1, 1]  # counted: one per non-empty chunk
    assert record.completion_tokens == 12 and record.num_output_tokens == 12


def test_streamed_usage_gives_exact_counts(loopback):
    record = call(loopback.url("chunk5,usage"))
    assert (record.chunk_tokens, record.is_usage_streamed) == ([5, 5, 2], True)


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("e400", "4xx"),
        ("e500", "5xx"),
        ("empty", "empty"),
        ("badjson", "bad_stream"),
        ("nodone", "bad_stream"),
        ("errevent", "bad_stream"),
    ],
)
def test_error_classes(loopback, mode, error):
    record = call(loopback.url(mode))
    assert record.error == error
    assert record.end_ns >= record.sent_ns


def test_timeout(loopback):
    record = call(loopback.url("hang"), timeout_s=0.2)
    assert record.error == "timeout"
    assert 0.2e9 <= record.end_ns - record.sent_ns < 2e9


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the request
    assert call(f"http://127.0.0.1:{port}").error == "connection"


def test_extra_body_is_merged_and_null_drops_a_field():
    extra = {"ignore_eos": None, "generation_config": '{"eos_token_id": -1}', "model": "/m"}
    body = json.loads(request_body(REQUEST, RequestOptions(model="default"), extra))
    assert "ignore_eos" not in body and body["model"] == "/m"
    assert body["generation_config"] == '{"eos_token_id": -1}'
    assert body["max_tokens"] == REQUEST.output_len and body["stream"] is True


def test_extra_bodies_attach_to_named_targets_only():
    targets = [parse_target("a=http://x"), parse_target("b=http://y")]
    a, b = with_extra_bodies(targets, ['a={"top_k": 1}', 'a={"seed": 2}'])
    assert (a.extra_body, b.extra_body) == ({"top_k": 1, "seed": 2}, {})
    with pytest.raises(ValueError, match="not a --target"):
        with_extra_bodies(targets, ['c={"top_k": 1}'])
    with pytest.raises(ValueError, match="bad --extra-body"):
        with_extra_bodies(targets, ["a=[1]"])
