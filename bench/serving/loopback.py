"""A built-in OpenAI-shaped SSE server with known timings, on loopback.

Tests drive the real client against it, and `calibrate` measures the client's
own ceiling with it. The path prefix picks a behaviour, so one server serves
every case: `http://127.0.0.1:PORT/<mode>` is a target, with `<mode>` a
comma-separated list of flags:
  ok        stream normally (first token after first_token_delay_s, then one chunk
            per token_interval_s)
  chunkN    N tokens per chunk
  usage     usage on every chunk (like vLLM's continuous usage stats)
  eNNN      answer with HTTP status NNN
  empty     a well-formed stream with no text
  badjson   a data line that is not JSON
  nodone    end the stream without [DONE]
  errevent  an error object mid-stream
  hang      never send anything
  serialN   one request at a time holds a server-wide lock for N ms before its
            first token (a single prefill engine), so TTFT grows with load and a
            rate search finds a real knee near 1000/N requests/s
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def count_words(text: str) -> int:
    return len(text.split())


@dataclass(frozen=True)
class LoopbackConfig:
    """Timings of the streamed answers."""

    first_token_delay_s: float = 0.0
    """Sleep before the first token."""
    token_interval_s: float = 0.0
    """Sleep between chunks after the first."""
    prompt_counter: Callable[[str], int] = field(default=count_words)
    """How the server counts prompt tokens for usage."""
    model: str = "loopback"
    """Name under /v1/models."""


def _flags(mode: str) -> dict[str, int]:
    """`"chunk3,usage"` -> {"chunk": 3, "usage": 1}."""
    flags = {}
    for flag in mode.split(","):
        name = flag.rstrip("0123456789")
        flags[name] = int(flag[len(name) :] or 1)
    return flags


def _chunk(api: str, text: str | None, usage: dict | None) -> dict:
    if text is None:
        choices = []
    elif api == "chat":
        choices = [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
    else:
        choices = [{"index": 0, "text": text, "finish_reason": None}]
    chunk = {"id": "cmpl-loopback", "object": "chunk", "created": 0, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _events(
    config: LoopbackConfig, api: str, body: dict, flags: dict, prefill: asyncio.Lock
) -> AsyncIterator[str]:
    prompt = body.get("prompt") or "\n\n".join(m["content"] for m in body["messages"])
    usage = {"prompt_tokens": config.prompt_counter(prompt), "completion_tokens": 0}
    per_chunk, num_tokens = flags.get("chunk", 1), int(body.get("max_tokens", 16))
    if api == "chat":
        yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    if "serial" in flags:
        async with prefill:
            await asyncio.sleep(flags["serial"] / 1000)
    await asyncio.sleep(config.first_token_delay_s)
    if "badjson" in flags:
        yield "data: {not json\n\n"
    sent = 0
    while sent < num_tokens and "empty" not in flags:
        if sent:
            await asyncio.sleep(config.token_interval_s)
        n = min(per_chunk, num_tokens - sent)
        sent += n
        usage["completion_tokens"] = sent
        yield _sse(_chunk(api, "tok " * n, dict(usage) if "usage" in flags else None))
        if "errevent" in flags:
            yield _sse({"error": {"message": "injected", "type": "server_error"}})
    yield _sse(_chunk(api, None, usage))
    if "nodone" not in flags:
        yield _sse("[DONE]")


def build_app(config: LoopbackConfig) -> Starlette:
    prefill = asyncio.Lock()

    async def generate(request: Request) -> Response:
        flags = _flags(request.path_params["mode"])
        body = json.loads(await request.body())
        if "e" in flags:
            return JSONResponse({"error": {"message": "injected"}}, status_code=flags["e"])
        if "hang" in flags:
            await asyncio.Event().wait()
        events = _events(config, request.path_params["api"], body, flags, prefill)
        return StreamingResponse(events, media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": config.model, "object": "model"}]})

    return Starlette(
        routes=[
            Route("/{mode}/v1/models", models),
            Route("/{mode}/v1/{api:path}", generate, methods=["POST"]),
        ]
    )


class LoopbackServer:
    """uvicorn on 127.0.0.1, a free port, in a daemon thread; a context manager."""

    def __init__(self, config: LoopbackConfig | None = None, start_timeout_s: float = 10.0):
        app = build_app(config or LoopbackConfig())
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                log_level="warning",
                lifespan="off",
                timeout_graceful_shutdown=1,
            )
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._start_timeout_s = start_timeout_s

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("loopback SSE server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

    def url(self, mode: str = "ok") -> str:
        return f"http://127.0.0.1:{self.port}/{mode}"


def main() -> None:
    """`python -m bench.serving.loopback`: serve with zero delays and print `PORT <n>`.

    A separate process, so `calibrate` measures the client alone, not the client
    and the server sharing one interpreter.
    """
    with LoopbackServer() as server:
        print(f"PORT {server.port}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
