"""KServe V2 gRPC: protobuf in and out, and the servicer over a fake generator (against a
cluster: test_kserve_grpc_cluster.py).

NOTE: this process imports tritonclient's generated messages, never disagg's (both
define package `inference`, and protobuf refuses the second); the in-process
servicer tests run on tritonclient's messages, which are the same wire format.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from coordinator.errors import NotFoundError
from coordinator.frontend import Frontend
from coordinator.generation import Completion, GenerationRequest, TextChunk
from coordinator.kserve_grpc import FINAL_FLAG, KServeServicer, input_tensors, parse_job, set_params
from coordinator.request_timing import RequestTrace
from disagg.errors import InvalidRequestError

# --- protobuf in and out, no cluster -----------------------------------------------------


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return [len(m["content"]) for m in messages]


class FakeGenerator:
    """Echoes the prompt back in three chunks, so responses can be checked exactly."""

    def __init__(self, hang_after_first: bool = False) -> None:
        self.closed: list[str] = []
        self.hang_after_first = hang_after_first

    def check(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise InvalidRequestError("prompt is empty", "prompt")

    async def stream(self, request: GenerationRequest, trace: RequestTrace) -> AsyncIterator:
        self.check(request)
        text = "".join(chr(i) for i in request.prompt_ids)
        try:
            for i, piece in enumerate([text[:1], text[1:2], text[2:]]):
                await asyncio.sleep(0)
                yield TextChunk(piece, [], [], "stop" if i == 2 else None, i + 1)
                if self.hang_after_first:
                    await asyncio.Event().wait()  # a long generation
        finally:
            self.closed.append(text)

    async def complete(self, request: GenerationRequest, trace: RequestTrace) -> Completion:
        text = "".join([c.text async for c in self.stream(request, trace)])
        return Completion(text, [1, 2, 3], [], "stop", len(request.prompt_ids), trace)


def fake_frontend() -> Frontend:
    registry = SimpleNamespace(healthy=lambda role: [role])
    model = SimpleNamespace(tokenizer=FakeTokenizer(), name="m")
    return Frontend(FakeGenerator(), model, "m", registry, None, None)


def infer_request(
    texts: list[str], name: str = "text_input", raw: bool = True, **fields
) -> service_pb2.ModelInferRequest:
    """What tritonclient sends: BYTES elements length-prefixed in raw_input_contents."""
    request = service_pb2.ModelInferRequest(**{"model_name": "m", **fields})
    tensor = request.inputs.add(name=name, datatype="BYTES", shape=[len(texts)])
    data = np.array([t.encode() for t in texts], dtype=object)
    if raw:
        request.raw_input_contents.append(serialize_byte_tensor(data).item())
    else:
        tensor.contents.bytes_contents.extend(data.tolist())
    return request


class Aborted(Exception):
    pass


class FakeContext:
    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)

    def time_remaining(self) -> float | None:
        return None  # a call without a deadline


def test_raw_and_typed_contents_give_the_same_tensors():
    texts = ["", "hello", "東京", "a\x00b"]
    raw, typed = input_tensors(infer_request(texts)), input_tensors(infer_request(texts, raw=False))
    assert raw == typed and raw[0].data == [t.encode() for t in texts]
    request = service_pb2.ModelInferRequest()
    numbers = request.inputs.add(name="max_tokens", datatype="INT64", shape=[1])
    numbers.contents.int64_contents.append(7)
    assert input_tensors(request)[0].data == [7]


@pytest.mark.parametrize("raw", [b"\x05\x00\x00\x00abc", b"\x01\x00"])
def test_truncated_raw_bytes_are_rejected(raw):
    request = infer_request(["x"])
    request.raw_input_contents[0] = raw
    with pytest.raises(InvalidRequestError):
        input_tensors(request)


def test_parameters_reach_sampling_params():
    request = infer_request(["hi"])
    set_params(request.parameters, {"max_tokens": 8, "temperature": 0, "top_p": 0.5})
    request.parameters["tenant_id"].string_param = "acme"
    request.parameters["ignore_eos"].bool_param = True
    request.parameters["priority"].uint64_param = 3  # Triton's own: ignored
    stop = request.inputs.add(name="stop", datatype="BYTES", shape=[2])  # lists go as tensors
    stop.contents.bytes_contents.extend([b"\n", b"END"])
    request.ClearField("raw_input_contents")
    request.inputs[0].contents.bytes_contents.append(b"hi")
    job = parse_job(request, fake_frontend())
    params = job.requests[0].params
    assert (params.max_tokens, params.temperature, params.top_p) == (8, 0.0, 0.5)
    assert params.stop == ("\n", "END") and params.ignore_eos
    assert job.requests[0].tenant == "acme"
    assert parse_job(infer_request(["hi"]), fake_frontend()).requests[0].tenant == "default"


def test_parse_batches_text_and_renders_chat_messages():
    frontend = fake_frontend()
    job = parse_job(infer_request(["ab", "c"], id="r1"), frontend)
    assert [r.prompt_ids for r in job.requests] == [[97, 98], [99]]
    assert job.id == "r1" and job.output_names == ["text_output", "finish_reason", "token_count"]
    chat = [
        json.dumps({"role": "user", "content": "hey"}),
        json.dumps({"role": "user", "content": "x"}),
    ]
    job = parse_job(infer_request(chat, name="messages"), frontend)
    assert [r.prompt_ids for r in job.requests] == [[3, 1]]


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda r: setattr(r, "model_name", "nope"), NotFoundError),
        (lambda r: setattr(r, "model_version", "2"), NotFoundError),
        (lambda r: setattr(r.inputs[0], "name", "input_ids"), InvalidRequestError),
        (lambda r: setattr(r.inputs[0], "datatype", "INT32"), InvalidRequestError),
        (lambda r: setattr(r.inputs[0], "datatype", "STRING"), InvalidRequestError),
        (lambda r: r.inputs[0].shape.append(2), InvalidRequestError),
        (lambda r: r.inputs[0].shape.__setitem__(0, 3), InvalidRequestError),
        (lambda r: r.inputs.add(name="prompt", datatype="BYTES", shape=[1]), InvalidRequestError),
        (lambda r: r.raw_input_contents.append(b""), InvalidRequestError),
        (lambda r: r.outputs.add(name="logits"), InvalidRequestError),
        (lambda r: setattr(r.parameters["top_k"], "string_param", "three"), InvalidRequestError),
        (lambda r: setattr(r.parameters["max_tokens"], "int64_param", 0), InvalidRequestError),
        (lambda r: setattr(r.parameters["temperature"], "bool_param", True), InvalidRequestError),
    ],
)
def test_parse_rejects_bad_requests(mutate, error):
    request = infer_request(["hi"])
    mutate(request)
    with pytest.raises(error):
        parse_job(request, fake_frontend())


def test_servicer_infer_answers_what_tritonclient_decodes():
    servicer = KServeServicer(fake_frontend(), service_pb2)
    request = infer_request(["abc", "xyz!"], id="r7")
    request.outputs.add(name="token_count")
    request.outputs.add(name="text_output")
    response = asyncio.run(servicer.ModelInfer(request, FakeContext()))
    result = triton.InferResult(response)
    assert result.as_numpy("text_output").tolist() == [b"abc", b"xyz!"]
    assert result.as_numpy("token_count").tolist() == [3, 3]
    assert result.as_numpy("finish_reason") is None  # not requested
    assert response.id == "r7" and response.parameters["e2e_s"].double_param >= 0


def test_servicer_maps_errors_to_status_codes():
    servicer = KServeServicer(fake_frontend(), service_pb2)
    cases = [
        (infer_request(["a"], model_name="nope"), grpc.StatusCode.NOT_FOUND),
        (infer_request(["a"], name="text"), grpc.StatusCode.INVALID_ARGUMENT),
        (infer_request([""]), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, code in cases:
        with pytest.raises(Aborted) as info:
            asyncio.run(servicer.ModelInfer(request, FakeContext()))
        assert info.value.args[0] == code


def test_servicer_stream_flags_the_last_chunk_and_reports_errors_in_band():
    frontend = fake_frontend()
    servicer = KServeServicer(frontend, service_pb2)

    async def requests():
        yield infer_request(["abcd"], id="a")
        yield infer_request(["xy"], id="bad", model_name="nope")
        yield infer_request(["wxyz"], id="b")

    async def collect():
        return [r async for r in servicer.ModelStreamInfer(requests(), FakeContext())]

    responses = asyncio.run(collect())
    errors = [r for r in responses if r.error_message]
    assert len(errors) == 1 and errors[0].infer_response.id == "bad"
    for request_id, text in [("a", "abcd"), ("b", "wxyz")]:
        mine = [r.infer_response for r in responses if r.infer_response.id == request_id]
        flags = [r.parameters[FINAL_FLAG].bool_param for r in mine]
        assert flags == [False, False, True]
        deltas = [triton.InferResult(r).as_numpy("text_output")[0] for r in mine]
        assert b"".join(deltas) == text.encode()
        assert [triton.InferResult(r).as_numpy("finish_reason") for r in mine[:-1]] == [None, None]
        assert triton.InferResult(mine[-1]).as_numpy("finish_reason").tolist() == [b"stop"]
    assert sorted(frontend.generator.closed) == ["abcd", "wxyz"]


def test_servicer_stream_cancelled_by_the_client_closes_its_generations():
    frontend = fake_frontend()
    frontend.generator = FakeGenerator(hang_after_first=True)
    servicer = KServeServicer(frontend, service_pb2)

    async def requests():
        yield infer_request(["abcd"], id="a")
        await asyncio.Event().wait()  # the client keeps its side open

    async def first_then_hang_up():
        responses = servicer.ModelStreamInfer(requests(), FakeContext())
        first = await anext(responses)
        await responses.aclose()
        return first

    assert asyncio.run(first_then_hang_up()).infer_response.id == "a"
    assert frontend.generator.closed == ["abcd"]
