"""Careless and hostile input on every front door (OpenAI, KServe REST, KServe gRPC) of the
in-process cluster: each bad request is answered in its protocol's error shape, naming the
field, before any KV block is allocated; every good edge value is served; afterwards every
block is free and the server still serves."""

from __future__ import annotations

import math

import grpc
import pytest

from tests.coordinator.front_door import LONE_SURROGATE, grpc_stub, infer_request, post

NAN, INF = math.nan, math.inf
S = LONE_SURROGATE
OK = None
"""The `param` of a case that must succeed."""

COMPLETION_CASES = [
    # (extra fields, status, param OpenAI names)
    ({"seed": -1}, 200, OK),
    ({"seed": -(2**63)}, 200, OK),
    ({"seed": 2**64 - 1}, 200, OK),
    ({"seed": 2**64}, 400, "seed"),
    ({"seed": -(2**63) - 1}, 400, "seed"),
    ({"seed": "1"}, 400, "seed"),
    ({"seed": 1.5}, 400, "seed"),
    ({"top_k": -1}, 200, OK),
    ({"top_k": 2**32}, 400, "top_k"),
    ({"top_k": -2}, 400, "top_k"),
    ({"temperature": NAN}, 400, "temperature"),
    ({"temperature": INF}, 400, "temperature"),
    ({"temperature": -INF}, 400, "temperature"),
    ({"temperature": 2.5}, 400, "temperature"),
    ({"temperature": -0.1}, 400, "temperature"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"temperature": 2}, 200, OK),
    ({"top_p": NAN}, 400, "top_p"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"max_tokens": 2**32}, 400, "max_tokens"),
    ({"max_tokens": 1.5}, 400, "max_tokens"),
    ({"max_tokens": None}, 200, OK),
    ({"prompt": S}, 400, "prompt"),
    ({"prompt": ["fine", "\udc00"]}, 400, "prompt"),
    ({"stop": S}, 400, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"stop": [""]}, 400, "stop"),
    ({"stop": [1]}, 400, "stop"),
    ({"user": S}, 400, "user"),
    ({S: 1}, 400, "body"),
    ({"n": 0}, 400, "n"),
    ({"n": 17}, 400, "n"),
    ({"logprobs": 6}, 400, "logprobs"),
    ({"logprobs": -1}, 400, "logprobs"),
    ({"presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"presence_penalty": 0.5}, 200, OK),
    ({"presence_penalty": 0}, 200, OK),
    ({"frequency_penalty": NAN}, 400, "frequency_penalty"),
    ({"frequency_penalty": -2, "presence_penalty": 2}, 200, OK),
    ({"frequency_penalty": "1"}, 400, "frequency_penalty"),
    ({"repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"repetition_penalty": 1e-7}, 400, "repetition_penalty"),
    ({"repetition_penalty": INF}, 400, "repetition_penalty"),
    ({"repetition_penalty": 1.3}, 200, OK),
    ({"logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"logit_bias": {"5": True}}, 400, "logit_bias"),
    ({"logit_bias": {"5": NAN}}, 400, "logit_bias"),
    ({"logit_bias": {"-5": 1}}, 400, "logit_bias"),
    ({"logit_bias": {"99999999999": 1}}, 400, "logit_bias"),
    ({"logit_bias": '{"5": 1}'}, 400, "logit_bias"),
    ({"logit_bias": {}}, 200, OK),
    ({"logit_bias": {"5": -100, "6": 100}}, 200, OK),
    ({"stream": True, "presence_penalty": -3}, 400, "presence_penalty"),
    ({"min_tokens": -1}, 400, "min_tokens"),
    ({"min_tokens": 3}, 400, "min_tokens"),
    ({"stream": True, "seed": 2**64}, 400, "seed"),
    ({"stream": True, "prompt": S}, 400, "prompt"),
    ({"stream": True, "temperature": NAN}, 400, "temperature"),
]

CHAT_CASES = [
    ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"max_completion_tokens": 1}, 200, OK),
    ({"messages": [{"role": "user", "content": S}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": S}]}]}, 400, "messages"),
    ({"stream": True, "messages": [{"role": "user", "content": S}]}, 400, "messages"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"temperature": NAN}, 400, "temperature"),
    ({"seed": -1, "temperature": 1.0}, 200, OK),
    ({"top_k": -1}, 200, OK),
    ({"response_format": "json"}, 400, "response_format"),  # found by the fuzz: was a 500
    ({"stream_options": []}, 400, "stream_options"),
    ({"messages": "Hi"}, 400, "messages"),
]

KSERVE_REST_CASES = [
    # (endpoint, body, status, field named in the message)
    ("generate", {"text_input": S}, 400, "text_input"),
    ("generate_stream", {"text_input": S}, 400, "text_input"),
    ("generate", {"messages": [f'{{"role": "user", "content": "{S}"}}']}, 400, "messages"),
    ("generate", {"text_input": "Hi", "parameters": {"seed": -1}}, 200, OK),
    ("generate", {"text_input": "Hi", "parameters": {"seed": 2**64}}, 400, "seed"),
    ("generate", {"text_input": "Hi", "parameters": {"top_k": -1}}, 200, OK),
    ("generate", {"text_input": "Hi", "parameters": {"top_k": 2**32}}, 400, "top_k"),
    ("generate", {"text_input": "Hi", "parameters": {"temperature": NAN}}, 400, "temperature"),
    ("generate", {"text_input": "Hi", "parameters": {"temperature": INF}}, 400, "temperature"),
    ("generate", {"text_input": "Hi", "parameters": {"top_p": 0}}, 400, "top_p"),
    ("generate", {"text_input": "Hi", "parameters": {"max_tokens": 0}}, 400, "max_tokens"),
    ("generate_stream", {"text_input": "Hi", "parameters": {"seed": NAN}}, 400, "seed"),
    ("generate", {"text_input": "Hi", "parameters": {"presence_penalty": 1.5}}, 200, OK),
    ("generate", {"text_input": "Hi", "parameters": {"presence_penalty": 3}}, 400, "presence"),
    ("generate", {"text_input": "Hi", "parameters": {"frequency_penalty": "x"}}, 400, "frequency"),
    ("generate", {"text_input": "Hi", "parameters": {"repetition_penalty": 0}}, 400, "repetition"),
    ("generate", {"text_input": "Hi", "parameters": {"repetition_penalty": 1.2}}, 200, OK),
    ("generate", {"text_input": "Hi", "parameters": {"logit_bias": {"5": 50}}}, 200, OK),
    ("generate", {"text_input": "Hi", "parameters": {"logit_bias": '{"5": -50}'}}, 200, OK),
    ("generate", {"text_input": "Hi", "parameters": {"logit_bias": {"5": 500}}}, 400, "logit_bias"),
    ("generate_stream", {"text_input": "Hi", "parameters": {"logit_bias": "{"}}, 400, "logit_bias"),
    (
        "infer",
        {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [S]}]},
        400,
        "inputs",
    ),
    (
        "infer",
        {
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hi"]}],
            "parameters": {"seed": -(2**63), "max_tokens": 2},
        },
        200,
        OK,
    ),
]

GRPC_CASES = [
    # (parameters as name -> (InferParameter field, value), prompt bytes, ok?, field named)
    ({"seed": ("int64_param", -1)}, b"Hi", OK),
    ({"seed": ("int64_param", -(2**63))}, b"Hi", OK),
    ({"seed": ("uint64_param", 2**64 - 1)}, b"Hi", OK),
    ({"seed": ("string_param", str(2**64))}, b"Hi", "seed"),
    ({"top_k": ("int64_param", -1)}, b"Hi", OK),
    ({"top_k": ("int64_param", 2**32)}, b"Hi", "top_k"),
    ({"temperature": ("double_param", NAN)}, b"Hi", "temperature"),
    ({"temperature": ("double_param", INF)}, b"Hi", "temperature"),
    ({"top_p": ("double_param", 0.0)}, b"Hi", "top_p"),
    ({"max_tokens": ("int64_param", 0)}, b"Hi", "max_tokens"),
    ({"presence_penalty": ("double_param", 0.5)}, b"Hi", OK),
    ({"presence_penalty": ("double_param", 2.5)}, b"Hi", "presence_penalty"),
    ({"repetition_penalty": ("double_param", NAN)}, b"Hi", "repetition_penalty"),
    ({"logit_bias": ("string_param", '{"5": 100}')}, b"Hi", OK),
    ({"logit_bias": ("string_param", '{"5": 100.5}')}, b"Hi", "logit_bias"),
    ({"logit_bias": ("string_param", '{"49152000": 1}')}, b"Hi", "logit_bias"),
    ({}, "\ud83d".encode("utf-8", "surrogatepass"), "text_input"),
]


@pytest.fixture(scope="module")
def serve(inprocess_cluster):
    return inprocess_cluster


def assert_serves_and_frees(serve) -> None:
    status, reply, _ = post(f"{serve.url}/v1/completions", {"prompt": "Hi", "max_tokens": 1})
    assert status == 200 and reply["usage"]["completion_tokens"] == 1, reply
    serve.wait_all_blocks_free()


@pytest.mark.parametrize(("fields", "status", "param"), COMPLETION_CASES)
def test_openai_completions(serve, fields, status, param):
    body = {"model": serve.model, "prompt": "Hi", "max_tokens": 2, **fields}
    got, reply, _ = post(f"{serve.url}/v1/completions", body)
    assert got == status, reply
    if param is not None:
        assert reply["error"]["type"] == "invalid_request_error", reply
        assert reply["error"]["param"] == param and reply["error"]["message"], reply
    assert_serves_and_frees(serve)


@pytest.mark.parametrize(("fields", "status", "param"), CHAT_CASES)
def test_openai_chat(serve, fields, status, param):
    body = {
        "model": serve.model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 2,
        **fields,
    }
    got, reply, _ = post(f"{serve.url}/v1/chat/completions", body)
    assert got == status, reply
    if param is not None:
        assert reply["error"]["param"] == param, reply
    else:
        assert reply["usage"]["completion_tokens"] <= body["max_completion_tokens"]
    assert_serves_and_frees(serve)


@pytest.mark.parametrize(("endpoint", "body", "status", "name"), KSERVE_REST_CASES)
def test_kserve_rest(serve, endpoint, body, status, name):
    url = f"{serve.url}/v2/models/{serve.model}/{endpoint}"
    params = {"max_tokens": 2, **body.get("parameters", {})}
    got, reply, _ = post(url, {**body, "parameters": params})
    assert got == status, reply
    if name is not None:
        assert list(reply) == ["error"] and name in reply["error"], reply
    assert_serves_and_frees(serve)


@pytest.mark.parametrize(("parameters", "prompt", "name"), GRPC_CASES)
def test_kserve_grpc(serve, parameters, prompt, name):
    channel, stub = grpc_stub(serve.grpc_port)
    with channel:
        request = infer_request(serve.model, prompt, **parameters)
        if name is None:
            assert stub.ModelInfer(request, timeout=30).outputs[0].name == "text_output"
        else:
            with pytest.raises(grpc.RpcError) as failure:
                stub.ModelInfer(request, timeout=30)
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert name in failure.value.details()
            (streamed,) = stub.ModelStreamInfer(iter([request]), timeout=30)
            assert name in streamed.error_message and streamed.infer_response.id == "r1"
    assert_serves_and_frees(serve)
