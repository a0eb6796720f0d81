"""One streamed request against an OpenAI-compatible server, timestamped on the way.

Bodies are serialized before the clock starts; while a response streams, the
loop only appends `perf_counter_ns()` and the bytes of each read. Parsing and
error classification happen once the request is over.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from bench.serving import record as rec
from bench.serving.record import RequestRecord
from bench.serving.sse import parse_stream
from bench.serving.structured import BENCH_SCHEMA, is_constrained, response_format
from bench.serving.workload import WorkloadRequest

APIS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
JSON_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


@dataclass(frozen=True)
class RequestOptions:
    """What every request of a run carries besides its prompt."""

    model: str = ""
    """Served model name sent as `model`."""
    api: str = "completions"
    """`completions` or `chat`."""
    is_ignore_eos: bool = True
    """Ask the server to generate exactly max_tokens (synthetic workloads)."""
    temperature: float = 0.0
    """Sampling temperature."""
    timeout_s: float = 600.0
    """Whole-request deadline, first byte to last."""
    json_schema_fraction: float = 0.0
    """Share of requests asking for JSON under `json_schema` (bench/serving/structured.py)."""
    json_schema: dict = field(default_factory=lambda: BENCH_SCHEMA)
    """The schema constrained requests send as `response_format`."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.json_schema_fraction <= 1.0:
            raise ValueError(
                f"json_schema_fraction must be in [0, 1], got {self.json_schema_fraction}"
            )
        if self.api not in APIS:
            raise ValueError(f"api must be one of {tuple(APIS)}, got {self.api!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


def request_body(
    request: WorkloadRequest,
    options: RequestOptions,
    extra: dict | None = None,
    messages: list[dict] | None = None,
) -> bytes:
    """The JSON body, built before the run so the hot path never serializes.

    `extra` is merged in last, for a server that spells a field its own way; a
    key set to None is left out (e.g. `ignore_eos` for a server that rejects it).
    `messages` replace the single user message of a chat body (a conversation's turn).
    """
    body: dict = {
        "model": options.model,
        "max_tokens": request.output_len,
        "temperature": options.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if options.is_ignore_eos:
        body["ignore_eos"] = True
    if options.api == "chat":
        body["messages"] = messages or [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    if is_constrained(request.index, options.json_schema_fraction):
        body["response_format"] = response_format(options.json_schema)
    body |= extra or {}
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


class HTTPStatusError(Exception):
    """The server answered with a 4xx or 5xx."""


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    record: RequestRecord,
    read_ns: list[int],
    reads: list[bytes],
) -> None:
    async with client.stream("POST", url, content=body, headers=JSON_HEADERS) as response:
        record.status = response.status_code
        if response.status_code >= 400:
            detail = await response.aread()
            raise HTTPStatusError(detail[:200].decode(errors="replace"))
        async for data in response.aiter_bytes():
            read_ns.append(time.perf_counter_ns())
            reads.append(data)


def classify(error: BaseException, status: int | None) -> str:
    """Map an exception to one of the record's error classes."""
    if isinstance(error, HTTPStatusError):
        return rec.HTTP_5XX if (status or 500) >= 500 else rec.HTTP_4XX
    if isinstance(error, (asyncio.TimeoutError, httpx.TimeoutException)):
        return rec.TIMEOUT
    if isinstance(error, (httpx.TransportError, OSError)):
        return rec.CONNECTION
    return rec.BAD_STREAM


async def send(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    record: RequestRecord,
    start_ns: int,
    timeout_s: float,
    is_reply_kept: bool = False,
) -> RequestRecord:
    """Send one request and fill `record`; never raises for request-level failures.

    is_reply_kept: store the generated text in `record.reply` (a conversation resends it).
    """
    read_ns: list[int] = []
    reads: list[bytes] = []
    record.sent_ns = time.perf_counter_ns() - start_ns
    try:
        await asyncio.wait_for(_stream(client, url, body, record, read_ns, reads), timeout_s)
    except Exception as error:  # every failure is a measured outcome, never a crash
        record.error = classify(error, record.status)
        record.error_detail = f"{type(error).__name__}: {error}"[:300]
    record.end_ns = time.perf_counter_ns() - start_ns
    _fill_from_stream(record, [t - start_ns for t in read_ns], reads, is_reply_kept)
    return record


def _fill_from_stream(
    record: RequestRecord, read_ns: list[int], reads: list[bytes], is_reply_kept: bool
) -> None:
    parsed = parse_stream(read_ns, reads)
    record.cached_tokens = parsed.cached_tokens
    if is_reply_kept:
        record.reply = parsed.text
    record.chunk_ns = parsed.chunk_ns
    record.chunk_tokens = parsed.chunk_tokens
    record.prompt_tokens = parsed.prompt_tokens
    record.completion_tokens = parsed.completion_tokens
    record.is_usage_streamed = parsed.is_usage_streamed
    record.server_timings = parsed.server_timings
    record.is_done = parsed.is_done
    if record.error is not None:
        return
    if parsed.error is not None:
        record.error, record.error_detail = rec.BAD_STREAM, parsed.error
    elif not record.chunk_ns:
        record.error, record.error_detail = rec.EMPTY, "no generated text in the stream"
