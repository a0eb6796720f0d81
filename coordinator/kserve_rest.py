"""KServe V2 REST (/v2/...): the Open Inference Protocol over HTTP, with Triton's binary
tensor data and generate extensions, so that `tritonclient.http` works with its defaults.

    GET  /v2                                 server metadata {name, version, extensions}
    GET  /v2/health/live, /v2/health/ready   200 (ready: 503 until both kinds of worker are up)
    GET  /v2/models/{m}[/versions/{v}]       model metadata: the tensors of `kserve_tensors`
    GET  /v2/models/{m}[/versions/{v}]/ready {"name", "ready"}: 200, or 503 when not ready
    POST /v2/models/{m}[/versions/{v}]/infer            V2 inference, JSON or binary
    POST /v2/models/{m}[/versions/{v}]/generate         {"text_input", "parameters"} -> one JSON
    POST /v2/models/{m}[/versions/{v}]/generate_stream  the same as SSE `data: {...}` events

Choices:
- The model has one version, "1"; any other version is 404, like an unknown model.
- Per-response timings (ttft_s, queue_s, prefill_s, kv_transfer_s, kv_bytes, prefill_worker,
  decode_worker, e2e_s) go in the response's `parameters` (infer, generate, and the last
  generate_stream event), where standard clients ignore them.
- The tenant label is the `tenant_id` parameter, else the X-Tenant-Id header, else "default".
- Outputs are binary when the request asks (`outputs[i].parameters.binary_data`, else
  `parameters.binary_data_output`), with the `Inference-Header-Content-Length` header; else JSON.
- Errors are {"error": "..."} with the status `errors.classify` gives (503 + Retry-After when
  overloaded). A generate_stream that fails after its first event ends with a
  `data: {"error": "..."}` event. A client that goes away cancels its generations, which frees
  their KV blocks at once.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import ClassVar, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from coordinator.errors import MAX_BODY_BYTES, NotFoundError, TooLargeError, classify
from coordinator.frontend import SERVER_NAME, SERVER_VERSION, Frontend
from coordinator.generation import DEFAULT_TENANT, Completion, GenerationRequest, TextChunk
from coordinator.kserve_tensors import (
    MODEL_VERSION,
    OUTPUT_DATATYPES,
    Tensor,
    TextRequest,
    check_datatype,
    check_output_names,
    check_shape_value,
    flatten,
    model_metadata,
    output_tensors,
    parse_text_request,
    tensor_from_bytes,
    tensor_to_bytes,
    timing_parameters,
)
from coordinator.request_timing import RequestTrace
from disagg.errors import InvalidRequestError

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]

EXTENSIONS = ["binary_tensor_data", "parameters", "generate"]
HEADER_LENGTH = "Inference-Header-Content-Length"
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a client that left; nobody receives it, but the access log shows it."""


class ClientGoneError(Exception):
    """The client disconnected while its request ran."""


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
        name, version = request.path_params["model"], request.path_params.get("version")
        if not self.frontend.knows_model(name):
            raise NotFoundError(
                f"unknown model {name!r}; this server serves {self.frontend.served_name!r}"
            )
        if version is not None and version != MODEL_VERSION:
            raise NotFoundError(
                f"model {name!r} has no version {version!r}; its only version is {MODEL_VERSION!r}",
                "version",
            )

    # -- inference ----------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        self._check_model(request)
        header, binary = split_binary_body(
            await read_body(request), request.headers.get(HEADER_LENGTH)
        )
        inputs = request_inputs(header, binary)
        outputs = requested_outputs(header)
        text = parse_text_request(inputs, _object(header, "parameters"), self._tokenizer)
        completions = await _unless_client_leaves(request, self._complete_all(request, text))
        body = self._response_header(header, [c.trace for c in completions])
        return infer_response(body, output_tensors(completions, list(outputs)), outputs)

    async def generate(self, request: Request) -> Response:
        body, generation = await self._generation(request)
        completion = await _unless_client_leaves(
            request, self.frontend.generator.complete(generation)
        )
        return JSONResponse(self._generate_event(body, completion, completion.trace))

    async def generate_stream(self, request: Request) -> Response:
        body, generation = await self._generation(request)
        trace = RequestTrace(generation.request_id)
        chunks = ChunkPump(self.frontend.generator.stream(generation, trace))
        try:  # NOTE: the first chunk comes before any byte, so early errors keep their status
            first = await chunks.next()
        except BaseException:
            chunks.close()
            raise
        events = self._events(body, first, chunks, trace)
        return ClosingStreamingResponse(events, media_type="text/event-stream")

    async def _events(
        self, body: dict, first: TextChunk | None, chunks: ChunkPump, trace: RequestTrace
    ) -> AsyncIterator[str]:
        try:
            chunk = first
            while chunk is not None:
                yield _sse(self._generate_event(body, chunk, trace))
                chunk = await chunks.next()
        except Exception as error:
            yield _sse({"error": classify(error).message})
        finally:
            chunks.close()  # a client gone mid-stream frees the KV here

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
        body = parse_json(await read_body(request))
        inputs = [
            tensor_from_value(name, value)
            for name, value in body.items()
            if name not in ("id", "parameters")
        ]
        text = parse_text_request(inputs, _object(body, "parameters"), self._tokenizer)
        if len(text.prompts) != 1:
            raise InvalidRequestError("generate takes one prompt; use infer for a batch", "inputs")
        return body, self._generation_requests(request, text)[0]

    def _generation_requests(self, request: Request, text: TextRequest) -> list[GenerationRequest]:
        tenant = text.tenant or request.headers.get("x-tenant-id") or DEFAULT_TENANT
        return [GenerationRequest(ids, text.params, tenant) for ids in text.prompts]

    async def _complete_all(self, request: Request, text: TextRequest) -> list[Completion]:
        """A batch's prompts run at once as separate generations; one failure cancels the rest."""
        generator = self.frontend.generator
        tasks = [
            asyncio.ensure_future(generator.complete(r))
            for r in self._generation_requests(request, text)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _response_header(self, body: dict, traces: list[RequestTrace]) -> dict:
        header: dict = {"model_name": self.frontend.served_name, "model_version": MODEL_VERSION}
        if body.get("id") is not None:
            header["id"] = str(body["id"])
        if traces:
            header["parameters"] = timing_parameters(traces)
        return header

    @property
    def _tokenizer(self) -> object:
        return self.frontend.model.tokenizer


# -- request bodies ---------------------------------------------------------------------------


async def read_body(request: Request) -> bytes:
    """The body, refused (413) past MAX_BODY_BYTES whatever Content-Length claims."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TooLargeError(f"request body over the {MAX_BODY_BYTES}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TooLargeError(f"request body over the {MAX_BODY_BYTES}-byte limit")
        chunks.append(chunk)
    return decompress(b"".join(chunks), request.headers.get("content-encoding", "identity"))


def decompress(body: bytes, encoding: str) -> bytes:
    """tritonclient can gzip or deflate (zlib) requests; the limit holds after inflating."""
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.lower())
    if encoding.lower() == "identity":
        return body
    if wbits is None:
        raise InvalidRequestError(f"unsupported Content-Encoding {encoding!r}", "content-encoding")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, MAX_BODY_BYTES + 1)
    except zlib.error as error:
        raise InvalidRequestError(f"bad {encoding} body: {error}", "content-encoding") from None
    if len(data) > MAX_BODY_BYTES:
        raise TooLargeError(f"request body over the {MAX_BODY_BYTES}-byte limit once inflated")
    if not inflater.eof:
        raise InvalidRequestError(f"truncated {encoding} body", "content-encoding")
    return data


def split_binary_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """Binary tensor data extension: the first `header_length` bytes are JSON, the rest tensors."""
    if header_length is None:
        return parse_json(body), b""
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise InvalidRequestError(
            f"{HEADER_LENGTH} must be a byte count within the body, got {header_length!r}",
            HEADER_LENGTH,
        )
    length = int(header_length)
    return parse_json(body[:length]), body[length:]


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise InvalidRequestError(f"malformed JSON: {error}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


def _object(body: dict, key: str) -> dict:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{key} must be a JSON object", key)
    return value


def request_inputs(header: dict, binary: bytes) -> list[Tensor]:
    """The `inputs`, each from its JSON `data` or its slice of the binary section, in order."""
    entries = header.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise InvalidRequestError("inputs must be a non-empty list", "inputs")
    tensors, offset = [], 0
    for entry in entries:
        tensor, offset = _input(entry, binary, offset)
        tensors.append(tensor)
    if offset != len(binary):
        raise InvalidRequestError(
            f"the binary section has {len(binary)} bytes but the inputs' binary_data_size "
            f"add up to {offset}",
            "binary_data_size",
        )
    return tensors


def _input(entry: object, binary: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise InvalidRequestError("each input needs a name", "inputs")
    name = entry["name"]
    datatype = check_datatype(name, entry.get("datatype"))
    shape = check_shape_value(name, entry.get("shape"))
    parameters = _object(entry, "parameters")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in entry:
            raise InvalidRequestError(f"input {name!r} has no data", name)
        tensor = Tensor(name, datatype, shape, flatten(entry["data"]), parameters)
        tensor.check_elements()
        return tensor, offset
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
        raise InvalidRequestError(
            f"input {name!r}: binary_data_size {size!r} does not fit the binary section", name
        )
    raw = binary[offset : offset + size]
    return tensor_from_bytes(name, datatype, shape, raw, parameters), offset + size


def requested_outputs(header: dict) -> dict[str, bool]:
    """Output name -> whether it goes binary; every output when none is named."""
    default_binary = _object(header, "parameters").get("binary_data_output") is True
    entries = header.get("outputs")
    if entries is None:
        return dict.fromkeys(OUTPUT_DATATYPES, default_binary)
    if not isinstance(entries, list):
        raise InvalidRequestError("outputs must be a list", "outputs")
    outputs: dict[str, bool] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidRequestError("each output needs a name", "outputs")
        binary = _object(entry, "parameters").get("binary_data", default_binary)
        outputs[entry["name"]] = binary is True
    check_output_names(outputs)
    return outputs


def tensor_from_value(name: str, value: object) -> Tensor:
    """A generate-extension input: a JSON value by name, its datatype read off the value."""
    data = flatten(value)
    sample = data[0] if data else ""
    if isinstance(sample, bool):
        datatype = "BOOL"
    elif isinstance(sample, int):
        datatype = "INT64"
    elif isinstance(sample, float):
        datatype = "FP64"
    else:
        datatype = "BYTES"
    return Tensor(name, datatype, [len(data)], data)


# -- responses --------------------------------------------------------------------------------


def infer_response(header: dict, tensors: list[Tensor], binary: dict[str, bool]) -> Response:
    """JSON, or with any binary output the header JSON followed by the outputs' bytes."""
    blobs, entries = [], []
    for tensor in tensors:
        entry: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary[tensor.name]:
            raw = tensor_to_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = tensor.data
        entries.append(entry)
    body = json.dumps({**header, "outputs": entries}, ensure_ascii=False).encode()
    if not blobs:
        return Response(body, media_type="application/json")
    return Response(
        body + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(body))},
    )


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends, so a gone client frees KV now."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


class ChunkPump:
    """Runs one generation stream in a task of its own, feeding a queue.

    NOTE: Starlette streams under an anyio cancel scope, which re-cancels every await inside
    it until the scope exits. Closing the generation there would cancel its own cleanup, the
    Free that returns the KV blocks. Its own task is cancelled exactly once, and then frees.
    """

    _closing: ClassVar[set[asyncio.Task]] = set()  # strong references while cleanup runs

    def __init__(self, stream: AsyncGenerator[TextChunk, None]) -> None:
        self._queue: asyncio.Queue[TextChunk | Exception | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run(stream))

    async def _run(self, stream: AsyncGenerator[TextChunk, None]) -> None:
        try:
            async for chunk in stream:
                self._queue.put_nowait(chunk)
            self._queue.put_nowait(None)
        except Exception as error:
            self._queue.put_nowait(error)
        finally:
            await stream.aclose()

    async def next(self) -> TextChunk | None:
        """The next chunk; None once the stream is over; the stream's error, raised."""
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
            self._closing.add(self._task)
            self._task.add_done_callback(self._closing.discard)


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and freeing its KV) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task not in done:
        raise ClientGoneError()
    return task.result()


async def _disconnected(request: Request) -> None:
    # NOTE: the body is already read, so the next ASGI message is the disconnect (servers
    # send it at the latest once the response is complete).
    while (await request.receive())["type"] != "http.disconnect":
        pass
