"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Responses and stream chunks follow OpenAI's shapes, so the official SDK works
unchanged; each response also carries its own timings under `metrics`, a key
OpenAI clients ignore.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from coordinator.auth import scope_tenant
from coordinator.client_deadline import apply_deadline, openai_deadline_s
from coordinator.errors import ClientGoneError, classify
from coordinator.frontend import Frontend
from coordinator.generation_runner import ChunkStreams
from coordinator.http_io import (
    CLIENT_CLOSED_REQUEST,
    ClosingStreamingResponse,
    parse_json_object,
    read_body,
    sse,
    until_disconnected,
)
from coordinator.openai_protocol import ParsedRequest, parse_chat, parse_completion
from coordinator.openai_shapes import ChatShape, CompletionShape, Shape, usage
from coordinator.quotas import Lease
from coordinator.request_timing import timings
from coordinator.structured_output import check_constraints, openai_fields


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


class OpenAIApi:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> JSONResponse:
        try:
            self.frontend.check_model(request.path_params["model_id"])
        except Exception as error:
            return error_response(error)
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
            body = parse_json_object(await read_body(request))
            self.frontend.check_model(body.get("model", self.frontend.served_name))
            parsed: ParsedRequest = parse(
                body, self.frontend.model, request.headers.get("x-tenant-id")
            )
            apply_deadline(parsed.requests, openai_deadline_s(request.headers, parsed.stream))
            if (tenant := scope_tenant(request.scope)) is not None:
                for generation in parsed.requests:  # with API keys, the key names the tenant
                    generation.tenant = tenant
            await check_constraints(parsed.requests, self.frontend.model, openai_fields(body))
            response_id = f"{shape.id_prefix}-{uuid.uuid4().hex}"
            lease = self.frontend.quotas.admit(parsed.requests[0].tenant)
            if parsed.stream:
                try:
                    streams = self.frontend.runner.stream(parsed.requests)
                except BaseException:
                    lease.release()
                    raise
                chunks = self._sse(streams, parsed, shape, response_id, lease)
                return ClosingStreamingResponse(chunks, media_type="text/event-stream")
            try:
                return await self._complete(request, parsed, shape, response_id)
            finally:
                lease.release()
        except ClientGoneError:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as error:
            return error_response(error)

    async def _complete(
        self, request: Request, parsed: ParsedRequest, shape: Shape, response_id: str
    ) -> Response:
        completions = await self.frontend.runner.complete_all(
            parsed.requests, partial(until_disconnected, request)
        )
        body = shape.response(response_id, self.frontend.served_name, completions, parsed)
        body["usage"] = usage(
            parsed,
            [c.num_completion_tokens for c in completions],
            [c.trace.num_cached_tokens for c in completions],
        )
        body["metrics"] = (
            timings(completions[0].trace)
            if len(completions) == 1
            else [timings(c.trace) for c in completions]
        )
        return JSONResponse(body)

    async def _sse(
        self,
        streams: ChunkStreams,
        parsed: ParsedRequest,
        shape: Shape,
        response_id: str,
        lease: Lease,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.frontend.served_name
        counts = [0] * len(parsed.requests)
        try:
            for index in range(len(parsed.requests)):
                for chunk in shape.opening_chunks(response_id, created, model, index):
                    yield sse(chunk)
            while (item := await streams.next()) is not None:
                index, chunk = item
                if isinstance(chunk, Exception):
                    yield sse(json.loads(error_response(chunk).body))
                    continue
                counts[index] = chunk.num_completion_tokens
                yield sse(shape.chunk(response_id, created, model, index, chunk, parsed))
            if parsed.include_usage:
                final = shape.envelope(response_id, created, model, [])
                final["usage"] = usage(
                    parsed, counts, [t.num_cached_tokens for t in streams.traces]
                )
                final["metrics"] = [timings(t) for t in streams.traces]
                yield sse(final)
            yield "data: [DONE]\n\n"
        finally:
            streams.close()  # a client gone mid-stream frees the KV here
            lease.release()
