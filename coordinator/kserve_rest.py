"""KServe V2 REST (/v2/...): the Open Inference Protocol over HTTP, with Triton's binary
tensor data and generate extensions, so that `tritonclient.http` works with its defaults.

    GET  /v2                                 server metadata {name, version, extensions}
    GET  /v2/health/live, /v2/health/ready   200 (ready: 503 until both kinds of worker are up)
    GET  /v2/models/{m}[/versions/{v}]       model metadata: the tensors of `kserve_text`
    GET  /v2/models/{m}[/versions/{v}]/ready {"name", "ready"}: 200, or 503 when not ready
    POST /v2/models/{m}[/versions/{v}]/infer            V2 inference, JSON or binary
    POST /v2/models/{m}[/versions/{v}]/generate         {"text_input", "parameters"} -> one JSON
    POST /v2/models/{m}[/versions/{v}]/generate_stream  the same as SSE `data: {...}` events

Choices:
- The model has one version, "1"; any other version is 404, like an unknown model.
- Per-response timings (ttft_s, queue_s, prefill_s, kv_transfer_s, kv_bytes, prefill_worker,
  decode_worker, e2e_s) go in the response's `parameters` (infer, generate, and the last
  generate_stream event), where standard clients ignore them.
- The tenant label is the API key's tenant when keys are configured; else the `tenant_id`
  parameter, else the X-Tenant-Id header, else "default".
- Outputs are binary when the request asks (`outputs[i].parameters.binary_data`, else
  `parameters.binary_data_output`), with the `Inference-Header-Content-Length` header; else JSON.
- Errors are {"error": "..."} with the status `errors.classify` gives (503 + Retry-After when
  overloaded). A generate_stream that fails after its first event ends with a
  `data: {"error": "..."}` event. A client that goes away cancels its generations, which frees
  their KV blocks at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from coordinator.auth import scope_tenant
from coordinator.errors import ClientGoneError, classify
from coordinator.frontend import MODEL_VERSION, SERVER_NAME, SERVER_VERSION, Frontend
from coordinator.generation import Completion, GenerationRequest, TextChunk, resolve_tenant
from coordinator.generation_runner import ChunkStreams
from coordinator.http_io import (
    CLIENT_CLOSED_REQUEST,
    ClosingStreamingResponse,
    parse_json_object,
    sse,
    until_disconnected,
)
from coordinator.kserve_rest_body import (
    HEADER_LENGTH,
    infer_response,
    json_object,
    read_kserve_body,
    request_inputs,
    requested_outputs,
    split_binary_body,
    tensor_from_value,
)
from coordinator.kserve_text import TextRequest, model_metadata, output_tensors, parse_text_request
from coordinator.quotas import Lease
from coordinator.request_timing import RequestTrace, merged_timings
from coordinator.structured_output import KSERVE_FIELDS, check_constraints
from disagg.errors import InvalidRequestError

Handler = Callable[[Request], Awaitable[Response]]

EXTENSIONS = ["binary_tensor_data", "parameters", "generate"]
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def routes(frontend: Frontend) -> list[BaseRoute]:
    api = KServeRest(frontend)
    # NOTE: `{model:path}` lets served names contain "/" (tritonclient leaves it unquoted),
    # so the longer patterns must come before the bare metadata route.
    model = "/v2/models/{model:path}"
    version = model + "/versions/{version}"
    table: list[tuple[str, Handler, str]] = []
    for prefix in (version, model):
        table += [
            (prefix + "/infer", api.infer, "POST"),
            (prefix + "/generate", api.generate, "POST"),
            (prefix + "/generate_stream", api.generate_stream, "POST"),
            (prefix + "/ready", api.model_ready, "GET"),
        ]
    table += [
        (version, api.model_metadata, "GET"),
        (model, api.model_metadata, "GET"),
        ("/v2", api.server_metadata, "GET"),
        ("/v2/health/live", api.live, "GET"),
        ("/v2/health/ready", api.ready, "GET"),
    ]
    return [Route(path, _with_errors(h), methods=[m]) for path, h, m in table] + [
        Route("/v2/{rest:path}", _with_errors(api.no_such_endpoint), methods=ALL_METHODS)
    ]


def _with_errors(handler: Handler) -> Handler:
    """Every failure becomes {"error": ...} with the shared status mapping; the server stays up."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientGoneError:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as error:
            return error_response(error)

    return endpoint


def error_response(error: Exception) -> JSONResponse:
    http = classify(error)
    return JSONResponse({"error": http.message}, http.status, headers=http.headers)


class KServeRest:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    # -- metadata and health ------------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}
        )

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if self.frontend.is_ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        self._check_model(request)
        return JSONResponse(model_metadata(self.frontend.served_name))

    async def model_ready(self, request: Request) -> Response:
        self._check_model(request)
        is_ready = self.frontend.is_ready
        body = {"name": self.frontend.served_name, "ready": is_ready}
        return JSONResponse(body, 200 if is_ready else 503)

    async def no_such_endpoint(self, request: Request) -> Response:
        message = f"{request.method} {request.url.path} is not a KServe V2 endpoint"
        return JSONResponse({"error": message}, 404)

    def _check_model(self, request: Request) -> None:
        self.frontend.check_model(request.path_params["model"], request.path_params.get("version"))

    # -- inference ----------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        self._check_model(request)
        header, binary = split_binary_body(
            await read_kserve_body(request), request.headers.get(HEADER_LENGTH)
        )
        inputs = request_inputs(header, binary)
        outputs = requested_outputs(header)
        text = parse_text_request(inputs, json_object(header, "parameters"), self._tokenizer)
        generations = self._generation_requests(request, text)
        await check_constraints(generations, self.frontend.model, KSERVE_FIELDS)
        with self._lease(generations):
            completions = await self.frontend.runner.complete_all(
                generations, partial(until_disconnected, request)
            )
        body = self._response_header(header, [c.trace for c in completions])
        return infer_response(body, output_tensors(completions, list(outputs)), outputs)

    async def generate(self, request: Request) -> Response:
        body, generation = await self._generation(request)
        with self._lease([generation]):
            completions = await self.frontend.runner.complete_all(
                [generation], partial(until_disconnected, request)
            )
        return JSONResponse(self._generate_event(body, completions[0], completions[0].trace))

    async def generate_stream(self, request: Request) -> Response:
        body, generation = await self._generation(request)
        lease = self.frontend.quotas.admit(generation.tenant)
        try:
            streams = self.frontend.runner.stream([generation])
        except BaseException:
            lease.release()
            raise
        try:  # NOTE: the first chunk comes before any byte, so early errors keep their status
            first = await streams.next_chunk()
        except BaseException:
            streams.close()
            lease.release()
            raise
        events = self._events(body, first, streams, lease)
        return ClosingStreamingResponse(events, media_type="text/event-stream")

    async def _events(
        self, body: dict, first: TextChunk | None, streams: ChunkStreams, lease: Lease
    ) -> AsyncIterator[str]:
        trace = streams.traces[0]
        try:
            chunk = first
            while chunk is not None:
                yield sse(self._generate_event(body, chunk, trace))
                chunk = await streams.next_chunk()
        except Exception as error:
            yield sse({"error": classify(error).message})
        finally:
            streams.close()  # a client gone mid-stream frees the KV here
            lease.release()

    def _generate_event(
        self, body: dict, result: Completion | TextChunk, trace: RequestTrace
    ) -> dict:
        """A generate response, or one generate_stream event: the outputs by name."""
        event = self._response_header(body, [trace] if result.finish_reason else [])
        for tensor in output_tensors([result]):
            event[tensor.name] = tensor.data[0]
        if not result.finish_reason:
            del event["finish_reason"]  # only the last event of a stream says why it ended
        return event

    async def _generation(self, request: Request) -> tuple[dict, GenerationRequest]:
        """Parse a generate body (inputs by name, plus `parameters`) into one generation."""
        self._check_model(request)
        body = parse_json_object(await read_kserve_body(request))
        inputs = [
            tensor_from_value(name, value)
            for name, value in body.items()
            if name not in ("id", "parameters")
        ]
        text = parse_text_request(inputs, json_object(body, "parameters"), self._tokenizer)
        if len(text.prompts) != 1:
            raise InvalidRequestError("generate takes one prompt; use infer for a batch", "inputs")
        generations = self._generation_requests(request, text)
        await check_constraints(generations, self.frontend.model, KSERVE_FIELDS)
        return body, generations[0]

    @contextmanager
    def _lease(self, generations: list[GenerationRequest]) -> Iterator[None]:
        """The tenant's quota held while the request runs (429 when over it)."""
        lease = self.frontend.quotas.admit(generations[0].tenant)
        try:
            yield
        finally:
            lease.release()

    def _generation_requests(self, request: Request, text: TextRequest) -> list[GenerationRequest]:
        tenant = scope_tenant(request.scope) or resolve_tenant(
            text.tenant, request.headers.get("x-tenant-id")
        )
        return [GenerationRequest(ids, text.params, tenant) for ids in text.prompts]

    def _response_header(self, body: dict, traces: list[RequestTrace]) -> dict:
        header: dict = {"model_name": self.frontend.served_name, "model_version": MODEL_VERSION}
        if body.get("id") is not None:
            header["id"] = str(body["id"])
        if traces:
            header["parameters"] = merged_timings(traces)
        return header

    @property
    def _tokenizer(self) -> object:
        return self.frontend.model.tokenizer
