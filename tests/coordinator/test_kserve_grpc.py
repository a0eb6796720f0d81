"""KServe V2 gRPC: protobuf in and out on its own, then `tritonclient.grpc` against the
in-process cluster (tiny model), and token-exactness on a real `disagg serve` (slow).

NOTE: this process imports tritonclient's generated messages, never disagg's (both
define package `inference`, and protobuf refuses the second); the in-process
servicer tests run on tritonclient's messages, which are the same wire format.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
import urllib.request
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from coordinator.errors import NotFoundError
from coordinator.frontend import Frontend
from coordinator.generation import Completion, GenerationRequest, TextChunk
from coordinator.kserve_grpc import FINAL_FLAG, KServeServicer, input_tensors, parse_job, set_params
from coordinator.request_timing import RequestTrace
from disagg.errors import InvalidRequestError
from disagg.model.tokenizer import apply_chat_template, encode_prompt
from tests.cluster_harness import ServeProcess, wait_until
from tests.helpers import reference_text, reference_tokens

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
        return [r async for r in servicer.ModelStreamInfer(requests(), None)]

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
        responses = servicer.ModelStreamInfer(requests(), None)
        first = await anext(responses)
        await responses.aclose()
        return first

    assert asyncio.run(first_then_hang_up()).infer_response.id == "a"
    assert frontend.generator.closed == ["abcd"]


# --- tritonclient.grpc against a real cluster ----------------------------------------------

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 16
GREEDY = {"max_tokens": NEW_TOKENS, "temperature": 0}
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def serve(inprocess_cluster):
    return inprocess_cluster


@pytest.fixture(scope="module")
def client(serve):
    client = triton.InferenceServerClient(f"127.0.0.1:{serve.grpc_port}")
    yield client
    client.close()


def greedy_texts(loaded) -> dict[str, str]:
    """transformers' greedy text for every prompt."""
    tok = loaded.tokenizer
    return {p: reference_text(loaded, encode_prompt(tok, p), NEW_TOKENS) for p in PROMPTS}


@pytest.fixture(scope="module")
def expected(tiny_fp32) -> dict[str, str]:
    return greedy_texts(tiny_fp32)


def text_input(prompts: list[str], name: str = "text_input") -> triton.InferInput:
    tensor = triton.InferInput(name, [len(prompts)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=object))
    return tensor


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status()


def test_health_and_metadata(client, tiny_fp32):
    name = tiny_fp32.name
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and not client.is_model_ready("nope")
    assert client.get_server_metadata().name == "disagg"
    metadata = client.get_model_metadata(name)
    assert metadata.name == name and list(metadata.versions) == ["1"]
    assert "text_input" in [t.name for t in metadata.inputs]
    assert [t.name for t in metadata.outputs] == ["text_output", "finish_reason", "token_count"]
    assert status_of(lambda: client.get_model_metadata("nope")) == "StatusCode.NOT_FOUND"


def check_infer_greedy(client, name: str, expected: dict[str, str]) -> None:
    prompt = PROMPTS[0]
    result = client.infer(name, [text_input([prompt])], request_id="req-1", parameters=GREEDY)
    assert result.as_numpy("text_output")[0].decode() == expected[prompt]
    assert result.as_numpy("finish_reason").tolist() == [b"length"]
    assert result.as_numpy("token_count").tolist() == [NEW_TOKENS]
    response = result.get_response()
    assert response.id == "req-1" and response.parameters["ttft_s"].double_param > 0


def test_infer_greedy_equals_transformers(client, tiny_fp32, expected):
    check_infer_greedy(client, tiny_fp32.name, expected)


@pytest.mark.slow
def test_real_model_infer_over_the_wire_equals_transformers(default_fp32):
    with ServeProcess("--prefill-workers", "1", "--decode-workers", "1") as serve:
        client = triton.InferenceServerClient(f"127.0.0.1:{serve.grpc_port}")
        try:
            check_infer_greedy(client, default_fp32.name, greedy_texts(default_fp32))
        finally:
            client.close()


def test_infer_batch_of_two_runs_both(client, tiny_fp32, expected):
    result = client.infer(tiny_fp32.name, [text_input(PROMPTS)], parameters=GREEDY)
    texts = [t.decode() for t in result.as_numpy("text_output")]
    assert texts == [expected[p] for p in PROMPTS]


def test_infer_chat_messages(client, tiny_fp32):
    messages = [{"role": "user", "content": "Say hi."}]
    tok = tiny_fp32.tokenizer
    tokens = reference_tokens(tiny_fp32.model, apply_chat_template(tok, messages), 8)
    tensor = text_input([json.dumps(m) for m in messages], name="messages")
    params = {"max_tokens": 8, "temperature": 0}
    result = client.infer(tiny_fp32.name, [tensor], parameters=params)
    assert result.as_numpy("text_output")[0].decode() == tok.decode(
        tokens, skip_special_tokens=True
    )


def collect_stream(responses: queue.Queue, num_final: int) -> list:
    """Every (result, error) until `num_final` requests have had their final response."""
    deadline = time.monotonic() + DEADLINE_S
    got, finals = [], 0
    while finals < num_final:
        result, error = responses.get(timeout=max(0.0, deadline - time.monotonic()))
        got.append((result, error))
        if error is None:
            finals += result.get_response().parameters[FINAL_FLAG].bool_param
    return got


def test_stream_deltas_concatenate_to_the_greedy_text(client, tiny_fp32, expected):
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for i, prompt in enumerate(PROMPTS):  # two requests in flight on one stream
            client.async_stream_infer(
                tiny_fp32.name, [text_input([prompt])], request_id=f"s{i}", parameters=GREEDY
            )
        got = collect_stream(responses, len(PROMPTS))
    finally:
        client.stop_stream()
    assert all(error is None for _, error in got), got
    for i, prompt in enumerate(PROMPTS):
        mine = [r for r, _ in got if r.get_response().id == f"s{i}"]
        assert len(mine) > 1
        flags = [r.get_response().parameters[FINAL_FLAG].bool_param for r in mine]
        assert flags == [False] * (len(mine) - 1) + [True]
        text = b"".join(r.as_numpy("text_output")[0] for r in mine).decode()
        assert text == expected[prompt]
        assert mine[-1].as_numpy("finish_reason").tolist() == [b"length"]


def test_bad_requests_get_status_codes_and_free_everything(serve, client, tiny_fp32):
    name = tiny_fp32.name
    good = [text_input([PROMPTS[0]])]
    assert status_of(lambda: client.infer("nope", good)) == "StatusCode.NOT_FOUND"
    wrong_name = [text_input([PROMPTS[0]], name="input_ids")]
    assert status_of(lambda: client.infer(name, wrong_name)) == "StatusCode.INVALID_ARGUMENT"
    wrong_type = triton.InferInput("text_input", [1], "INT32")
    wrong_type.set_data_from_numpy(np.array([1], dtype=np.int32))
    assert status_of(lambda: client.infer(name, [wrong_type])) == "StatusCode.INVALID_ARGUMENT"
    too_long = {"max_tokens": 10**6}
    assert status_of(lambda: client.infer(name, good, parameters=too_long)) == (
        "StatusCode.INVALID_ARGUMENT"
    )

    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("nope", good, request_id="bad")
        result, error = responses.get(timeout=DEADLINE_S)
        assert result is None and "unknown model" in str(error)
        # the stream survives the error; a long request is then cut off by the client
        params = {"max_tokens": 200, "ignore_eos": True, "tenant_id": "grpc-cancel"}
        client.async_stream_infer(name, good, request_id="long", parameters=params)
        result, error = responses.get(timeout=DEADLINE_S)
        assert error is None and result.get_response().id == "long"
    finally:
        client.stop_stream(cancel_requests=True)
    # a unary call whose deadline passes is cancelled on the server too
    params = {"max_tokens": 200, "ignore_eos": True, "tenant_id": "grpc-deadline"}
    late = status_of(lambda: client.infer(name, good, parameters=params, client_timeout=0.5))
    assert late == "StatusCode.DEADLINE_EXCEEDED"
    serve.wait_all_blocks_free()

    def both_cancelled() -> bool:
        return all(
            num_requests(serve, t, "cancelled") == 1 for t in ("grpc-cancel", "grpc-deadline")
        )

    wait_until(both_cancelled, 10, "both requests to be recorded as cancelled")


def num_requests(serve: ServeProcess, tenant: str, status: str) -> float:
    with urllib.request.urlopen(f"{serve.url}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    labels = (f'tenant="{tenant}"', f'status="{status}"')
    counts = [line for line in lines if line.startswith("disagg_requests_total{")]
    return sum(float(line.split()[-1]) for line in counts if all(lb in line for lb in labels))
