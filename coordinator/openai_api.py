"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Responses and stream chunks follow OpenAI's shapes, so the official SDK works
unchanged; each response also carries its own timings under `metrics`, a key
OpenAI clients ignore.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from coordinator.errors import MAX_BODY_BYTES, NotFoundError, TooLargeError, classify
from coordinator.frontend import Frontend
from coordinator.generation import Completion, TextChunk
from coordinator.openai_protocol import ParsedRequest, parse_chat, parse_completion
from coordinator.openai_shapes import ChatShape, CompletionShape, Shape, usage
from coordinator.request_timing import RequestTrace, timings
from disagg.errors import InvalidRequestError


def routes(frontend: Frontend) -> list[BaseRoute]:
    api = OpenAIApi(frontend)
    return [
        Route("/v1/models", api.models),
        Route("/v1/models/{model_id:path}", api.model),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
    ]


def error_response(error: Exception) -> JSONResponse:
    http = classify(error)
    body = {
        "error": {"message": http.message, "type": http.kind, "param": http.param, "code": None}
    }
    return JSONResponse(body, status_code=http.status, headers=http.headers)


async def read_json(request: Request) -> dict:
    """The body as a JSON object; 413 over the size limit, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TooLargeError(f"request body over {MAX_BODY_BYTES} bytes")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise TooLargeError(f"request body over {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequestError(f"body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise InvalidRequestError("body must be a JSON object")
    return body


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class OpenAIApi:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> JSONResponse:
        if not self.frontend.knows_model(request.path_params["model_id"]):
            return error_response(
                NotFoundError(f"model {request.path_params['model_id']!r} not found")
            )
        return JSONResponse(self._card())

    async def completions(self, request: Request) -> Response:
        return await self._serve(
            request, parse_completion, CompletionShape(self.frontend.model.tokenizer)
        )

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, parse_chat, ChatShape(self.frontend.model.tokenizer))

    def _card(self) -> dict:
        return {
            "id": self.frontend.served_name,
            "object": "model",
            "created": 0,
            "owned_by": "disagg",
        }

    async def _serve(self, request: Request, parse: Callable, shape: Shape) -> Response:
        try:
            body = await read_json(request)
            name = body.get("model", self.frontend.served_name)
            if not self.frontend.knows_model(name):
                raise NotFoundError(
                    f"model {name!r} not found; this server serves {self.frontend.served_name!r}"
                )
            parsed: ParsedRequest = parse(
                body, self.frontend.model, request.headers.get("x-tenant-id")
            )
            for generation in parsed.requests:
                self.frontend.generator.check(generation)
        except Exception as error:
            return error_response(error)
        response_id = f"{shape.id_prefix}-{uuid.uuid4().hex}"
        if parsed.stream:
            chunks = self._sse(parsed, shape, response_id)
            return StreamingResponse(chunks, media_type="text/event-stream")
        return await self._complete(request, parsed, shape, response_id)

    async def _complete(
        self, request: Request, parsed: ParsedRequest, shape: Shape, response_id: str
    ) -> Response:
        work = asyncio.ensure_future(
            asyncio.gather(*(self.frontend.generator.complete(r) for r in parsed.requests))
        )
        gone = asyncio.ensure_future(until_disconnected(request))
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client left: cancelling frees every sequence's KV
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return Response(status_code=499)
        gone.cancel()
        try:
            completions: list[Completion] = work.result()
        except Exception as error:
            return error_response(error)
        body = shape.response(response_id, self.frontend.served_name, completions, parsed)
        body["usage"] = usage(parsed, [c.num_completion_tokens for c in completions])
        body["metrics"] = (
            timings(completions[0].trace)
            if len(completions) == 1
            else [timings(c.trace) for c in completions]
        )
        return JSONResponse(body)

    async def _sse(
        self, parsed: ParsedRequest, shape: Shape, response_id: str
    ) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.frontend.served_name
        queue: asyncio.Queue[tuple[int, TextChunk | Exception | None]] = asyncio.Queue()
        traces = [RequestTrace(r.request_id) for r in parsed.requests]
        tasks = [
            asyncio.ensure_future(self._pump(index, request, traces[index], queue))
            for index, request in enumerate(parsed.requests)
        ]
        counts = [0] * len(tasks)
        try:
            for index in range(len(tasks)):
                for chunk in shape.opening_chunks(response_id, created, model, index):
                    yield sse(chunk)
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, Exception):
                    yield sse(json.loads(error_response(item).body))
                    remaining -= 1
                    continue
                counts[index] = item.num_completion_tokens
                yield sse(shape.chunk(response_id, created, model, index, item, parsed))
            if parsed.include_usage:
                final = shape.envelope(response_id, created, model, [])
                final["usage"] = usage(parsed, counts)
                final["metrics"] = [timings(t) for t in traces]
                yield sse(final)
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, index: int, request, trace: RequestTrace, queue: asyncio.Queue) -> None:
        stream = self.frontend.generator.stream(request, trace)
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
            await queue.put((index, None))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            await queue.put((index, error))
        finally:
            await stream.aclose()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
