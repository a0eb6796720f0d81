"""KServe V2 gRPC (inference.GRPCInferenceService), as `tritonclient.grpc` speaks it.

The text contract (which inputs, parameters and outputs mean what) is
`kserve_text`'s, shared with REST; this module only moves it in and out of
protobuf. Each prompt in a request is its own generation, run concurrently.
ModelStreamInfer is Triton's decoupled mode: each request on the stream gets one
response per text chunk, the last flagged `triton_final_response`; requests on a
stream run concurrently, and a failed one answers with `error_message` without
closing the stream.

NOTE: the generated messages are imported in `add_to_server`, not at the top.
They share package `inference` with tritonclient's own copy and protobuf refuses
to register both in one process, so a process that drives tritonclient (the
tests) must be able to import this module without them. The servicer takes the
message module as an argument; any wire-compatible one works.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import grpc

from coordinator.auth import ApiKeys, UnauthorizedError
from coordinator.client_deadline import apply_deadline, grpc_deadline_s
from coordinator.errors import NotFoundError, classify
from coordinator.frontend import MODEL_VERSION, SERVER_NAME, SERVER_VERSION, Frontend
from coordinator.generation import GenerationRequest, resolve_tenant
from coordinator.kserve_tensor import Tensor, check_datatype, tensor_from_bytes, tensor_to_bytes
from coordinator.kserve_text import (
    OUTPUT_DATATYPES,
    GenerationResult,
    check_output_names,
    model_metadata,
    output_tensors,
    parse_text_request,
)
from coordinator.request_timing import RequestTrace, merged_timings
from coordinator.structured_output import KSERVE_FIELDS, check_constraints
from disagg.errors import InvalidRequestError

if TYPE_CHECKING:
    from disagg.rpc import grpc_predict_v2_pb2 as pb

EXTENSIONS = ("parameters",)
FINAL_FLAG = "triton_final_response"
"""Triton's mark on a decoupled request's last response."""

CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "BYTES": "bytes_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT64": "uint64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}  # fmt: skip
"""Where InferTensorContents keeps each datatype (FP16 has no field: it only comes raw)."""

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(error: Exception) -> tuple[grpc.StatusCode, str]:
    http = classify(error)
    return STATUS_CODES.get(http.status, grpc.StatusCode.INTERNAL), http.message


# --- protobuf -> the text contract ---------------------------------------------------------


def param_values(parameters: Mapping[str, Any]) -> dict[str, object]:
    """InferParameter map -> plain values (whichever of the oneof is set)."""
    values = {}
    for key, param in parameters.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(param, choice)
    return values


def set_params(parameters: Any, values: Mapping[str, object]) -> None:
    """Plain values -> an InferParameter map; None is left out."""
    for key, value in values.items():
        if isinstance(value, bool):
            parameters[key].bool_param = value
        elif isinstance(value, int):
            parameters[key].int64_param = value
        elif isinstance(value, float):
            parameters[key].double_param = value
        elif value is not None:
            parameters[key].string_param = str(value)


def input_tensors(request: Any) -> list[Tensor]:
    """The request's inputs, from `raw_input_contents` (tritonclient's way) or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequestError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs", "inputs"
        )
    tensors = []
    for i, tensor in enumerate(request.inputs):
        datatype = check_datatype(tensor.name, tensor.datatype)
        shape, params = list(tensor.shape), param_values(tensor.parameters)
        if raw:
            tensors.append(tensor_from_bytes(tensor.name, datatype, shape, raw[i], params))
        else:
            data = list(getattr(tensor.contents, CONTENTS_FIELDS.get(datatype, ""), []))
            tensors.append(Tensor(tensor.name, datatype, shape, data, params))
    return tensors


@dataclass
class InferJob:
    """One parsed ModelInferRequest: what to generate, and what to answer with."""

    id: str
    model_name: str
    requests: list[GenerationRequest]
    output_names: list[str]


def parse_job(request: Any, frontend: Frontend, key_tenant: str | None = None) -> InferJob:
    """`key_tenant`, the API key's tenant when keys are on, wins over the `tenant_id` parameter."""
    frontend.check_model(request.model_name, request.model_version)
    text = parse_text_request(
        input_tensors(request), param_values(request.parameters), frontend.model.tokenizer
    )
    names = [output.name for output in request.outputs] or list(OUTPUT_DATATYPES)
    check_output_names(names)
    tenant = key_tenant or resolve_tenant(text.tenant)
    requests = [GenerationRequest(ids, text.params, tenant) for ids in text.prompts]
    return InferJob(request.id, request.model_name, requests, names)


# --- results -> protobuf ---------------------------------------------------------------------


def infer_response(
    messages: ModuleType, job: InferJob, results: Sequence[GenerationResult], names: list[str]
) -> pb.ModelInferResponse:
    """Outputs go in raw_output_contents: tritonclient's `as_numpy` reads BYTES only from there."""
    response = messages.ModelInferResponse(
        model_name=job.model_name, model_version=MODEL_VERSION, id=job.id
    )
    for tensor in output_tensors(results, names):
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(tensor_to_bytes(tensor))
    return response


@dataclass
class _Final:
    """The closing response of a stream whose tokens ran out without a finish reason."""

    num_completion_tokens: int
    text: str = ""
    finish_reason: str = "length"


# --- the service -------------------------------------------------------------------------------


class KServeServicer:
    """The GRPCInferenceService methods, over the coordinator's shared Frontend. With API keys,
    all but ServerLive, ServerReady and ModelReady need metadata `authorization: Bearer KEY`."""

    def __init__(
        self, frontend: Frontend, messages: ModuleType, api_keys: ApiKeys | None = None
    ) -> None:
        self.frontend = frontend
        self.pb = messages
        self.api_keys = api_keys or ApiKeys()

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> str | None:
        """The key's tenant (None when keys are off); aborts UNAUTHENTICATED otherwise."""
        if not self.api_keys.is_enabled:
            return None
        metadata = dict(context.invocation_metadata() or ())
        try:
            return self.api_keys.tenant(metadata.get("authorization"))
        except UnauthorizedError as error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return self.pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return self.pb.ServerReadyResponse(ready=self.frontend.is_ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self.frontend.check_model(request.name, request.version)
        except NotFoundError:
            return self.pb.ModelReadyResponse(ready=False)
        return self.pb.ModelReadyResponse(ready=self.frontend.is_ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        await self._authenticate(context)
        return self.pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        await self._authenticate(context)
        try:
            self.frontend.check_model(request.name, request.version)
        except NotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return self.pb.ModelMetadataResponse(**model_metadata(self.frontend.served_name))

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        tenant = await self._authenticate(context)
        try:
            return await self._infer(request, tenant, grpc_deadline_s(context))
        except Exception as exc:  # every failure becomes a status code
            code, message = grpc_status(exc)
        await context.abort(code, message)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        tenant = await self._authenticate(context)
        outbox: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        deadline_s = grpc_deadline_s(context)
        reader = asyncio.create_task(self._serve_stream(requests, outbox, tenant, deadline_s))
        try:
            while (response := await outbox.get()) is not None:
                yield response
        finally:
            # NOTE: a client that hangs up cancels this generator; cancelling the reader
            # closes every generation in flight, which frees their KV blocks now.
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _infer(
        self, request: pb.ModelInferRequest, tenant: str | None, deadline_s: float | None
    ) -> pb.ModelInferResponse:
        job = parse_job(request, self.frontend, tenant)
        apply_deadline(job.requests, deadline_s)
        await check_constraints(job.requests, self.frontend.model, KSERVE_FIELDS)
        lease = self.frontend.quotas.admit(job.requests[0].tenant)
        try:  # NOTE: a client that leaves cancels this handler, which cancels every generation
            completions = await self.frontend.runner.complete_all(job.requests)
        finally:
            lease.release()
        response = infer_response(self.pb, job, completions, job.output_names)
        set_params(response.parameters, merged_timings([c.trace for c in completions]))
        return response

    async def _serve_stream(
        self,
        requests: AsyncIterator[pb.ModelInferRequest],
        outbox: asyncio.Queue,
        tenant: str | None,
        deadline_s: float | None,
    ) -> None:
        """Start each request as it arrives; end the response stream once all have finished.
        Every request on the stream shares the call's deadline."""
        tasks: set[asyncio.Task] = set()
        try:
            async for request in requests:
                task = asyncio.create_task(self._stream_one(request, outbox, tenant, deadline_s))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            outbox.put_nowait(None)

    async def _stream_one(
        self,
        request: pb.ModelInferRequest,
        outbox: asyncio.Queue,
        tenant: str | None,
        deadline_s: float | None,
    ) -> None:
        try:
            job = parse_job(request, self.frontend, tenant)
            apply_deadline(job.requests, deadline_s)
            await check_constraints(job.requests, self.frontend.model, KSERVE_FIELDS)
            if len(job.requests) != 1:
                raise InvalidRequestError("ModelStreamInfer takes one prompt per request", "inputs")
            await self._stream_chunks(job, outbox)
        except Exception as exc:  # reported on the stream, which stays open
            _, message = grpc_status(exc)
            error = self.pb.ModelStreamInferResponse(error_message=message)
            error.infer_response.id = request.id  # so the client knows which request failed
            outbox.put_nowait(error)

    async def _stream_chunks(self, job: InferJob, outbox: asyncio.Queue) -> None:
        lease = self.frontend.quotas.admit(job.requests[0].tenant)
        try:
            await self._pump_chunks(job, outbox)
        finally:
            lease.release()

    async def _pump_chunks(self, job: InferJob, outbox: asyncio.Queue) -> None:
        streams = self.frontend.runner.stream(job.requests)
        trace = streams.traces[0]
        last: GenerationResult | None = None
        try:
            while (chunk := await streams.next_chunk()) is not None:
                outbox.put_nowait(self._chunk_response(job, chunk, trace))
                last = chunk
        finally:
            streams.close()
        if last is None or last.finish_reason is None:  # ran out unflagged: still close it
            count = last.num_completion_tokens if last else 0
            outbox.put_nowait(self._chunk_response(job, _Final(count), trace))

    def _chunk_response(
        self, job: InferJob, chunk: GenerationResult, trace: RequestTrace
    ) -> pb.ModelStreamInferResponse:
        """A text delta; only the final one carries finish_reason and the timings."""
        is_final = chunk.finish_reason is not None
        names = [n for n in job.output_names if is_final or n != "finish_reason"]
        response = infer_response(self.pb, job, [chunk], names)
        timings = merged_timings([trace]) if is_final else {}
        set_params(response.parameters, {FINAL_FLAG: is_final, **timings})
        return self.pb.ModelStreamInferResponse(infer_response=response)


def add_to_server(
    server: grpc.aio.Server, frontend: Frontend, api_keys: ApiKeys | None = None
) -> None:
    from disagg.rpc import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

    servicer = KServeServicer(frontend, grpc_predict_v2_pb2, api_keys)
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
