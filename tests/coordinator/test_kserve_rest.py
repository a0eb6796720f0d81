"""KServe V2 REST: parsing and encoding in-process over an echoing fake cluster (end to end
on a cluster: test_kserve_rest_cluster.py)."""

from __future__ import annotations

import asyncio
import gzip
import json
import time

import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from coordinator import kserve_rest
from coordinator.admission import OverloadedError
from coordinator.errors import MAX_BODY_BYTES, WorkerError
from coordinator.frontend import Frontend
from coordinator.kserve_tensor import pack_bytes, unpack_bytes
from tests.coordinator.echo_cluster import MODEL, EchoDispatcher, call_asgi, make_frontend

HEADER_LENGTH = "Inference-Header-Content-Length"

# ---------------------------------------------------------------------------------------------
# In-process: the real Generator and routes over a fake scheduler that echoes the prompt.


def make_client(frontend: Frontend) -> TestClient:
    return TestClient(Starlette(routes=kserve_rest.routes(frontend)))


@pytest.fixture
def frontend() -> Frontend:
    return make_frontend()


@pytest.fixture
def client(frontend) -> TestClient:
    return make_client(frontend)


def text_input(*texts: str, name: str = "text_input", **extra: object) -> dict:
    return {"name": name, "datatype": "BYTES", "shape": [len(texts)], "data": list(texts), **extra}


def infer(client: TestClient, body: dict | bytes, model: str = MODEL, **kwargs):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(f"/v2/models/{model}/infer", content=content, **kwargs)


def infer_binary(client: TestClient, inputs: list, outputs: list | None = None, **params):
    """A request as tritonclient.http encodes it, and the result as it decodes it."""
    body, json_size = triton.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, parameters=params
    )
    reply = client.post(
        f"/v2/models/{MODEL}/versions/1/infer",
        content=body,
        headers={HEADER_LENGTH: str(json_size)},
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/octet-stream"
    return triton.InferenceServerClient.parse_response_body(
        reply.content, header_length=int(reply.headers[HEADER_LENGTH])
    )


def test_server_and_model_metadata_and_health(client):
    server = client.get("/v2").json()
    assert server["name"] == "disagg" and "binary_tensor_data" in server["extensions"]
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"):
        meta = client.get(path).json()
        assert meta["name"] == MODEL and meta["versions"] == ["1"]
        assert {"name": "text_input", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
        assert [o["name"] for o in meta["outputs"]] == [
            "text_output",
            "finish_reason",
            "token_count",
        ]
    assert client.get(f"/v2/models/{MODEL}/versions/1/ready").json()["ready"] is True


def test_not_ready_is_503():
    client = make_client(make_frontend(is_ready=False))
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 503


def test_json_batch_filters_outputs_and_reports_timings(client):
    reply = infer(
        client,
        {
            "id": "req-7",
            "inputs": [text_input("hello", "hi", "hey there")],
            "outputs": [{"name": "token_count"}, {"name": "text_output"}],
            "parameters": {"max_tokens": 4, "temperature": 0},
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["id"] == "req-7" and body["model_name"] == MODEL and body["model_version"] == "1"
    assert [o["name"] for o in body["outputs"]] == ["token_count", "text_output"]
    assert body["outputs"][0] == {
        "name": "token_count", "datatype": "INT64", "shape": [3], "data": [4, 2, 4],
    }  # fmt: skip
    assert body["outputs"][1]["data"] == ["hell", "hi", "hey "]
    timings = body["parameters"]
    assert timings["ttft_s"] >= 0 and timings["decode_worker"] == "decode-1"


def test_binary_round_trip_with_tritonclients_own_encoding(client):
    prompt = triton.InferInput("text_input", [2], "BYTES")
    prompt.set_data_from_numpy(np.array(["héllo wörld".encode(), b"abc"], dtype=object))
    max_tokens = triton.InferInput("max_tokens", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([5], dtype=np.int32))
    outputs = [
        triton.InferRequestedOutput("text_output"),
        triton.InferRequestedOutput("token_count"),
    ]
    result = infer_binary(client, [prompt, max_tokens], outputs, temperature=0)
    assert result.as_numpy("text_output").tolist() == ["héllo".encode(), b"abc"]
    assert result.as_numpy("token_count").tolist() == [5, 3]
    assert result.get_output("finish_reason") is None


def test_binary_data_output_and_mixed_outputs(client):
    request = {"inputs": [text_input("abc")], "parameters": {"binary_data_output": True}}
    reply = infer(client, request)
    header_length = int(reply.headers[HEADER_LENGTH])
    header = json.loads(reply.content[:header_length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sum(sizes) == len(reply.content) - header_length
    assert unpack_bytes("x", reply.content[header_length:][: sizes[0]]) == [b"abc"]

    request["outputs"] = [
        {"name": "finish_reason", "parameters": {"binary_data": False}},
        {"name": "text_output"},
    ]
    reply = infer(client, request)
    header = json.loads(reply.content[: int(reply.headers[HEADER_LENGTH])])
    assert header["outputs"][0]["data"] == ["stop"]
    assert header["outputs"][1]["parameters"]["binary_data_size"] == 4 + 3


def test_gzip_request_body(client):
    body = json.dumps({"inputs": [text_input("zip")]}).encode()
    reply = infer(client, gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert reply.json()["outputs"][0]["data"] == ["zip"]


WAYANG_CHAT = {
    "id": "550e8400-e29b-41d4-a716-446655440001",
    "model_name": "gpt-4",
    "inputs": [
        {
            "name": "messages",
            "shape": [3, 2],
            "datatype": "BYTES",
            "data": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": "What is its population?"},
            ],
        }
    ],
    "parameters": {"max_tokens": 150, "temperature": 0.5},
}


def test_messages_as_objects_with_a_loose_shape_or_as_json_strings(client):
    reply = infer(client, WAYANG_CHAT)
    assert reply.status_code == 200, reply.text
    text = reply.json()["outputs"][0]["data"][0]
    assert text.startswith("<system>You are a helpful assistant.<user>What is the capital")
    as_strings = [json.dumps(m) for m in WAYANG_CHAT["inputs"][0]["data"]]
    reply = infer(client, {**WAYANG_CHAT, "inputs": [text_input(*as_strings, name="messages")]})
    assert reply.json()["outputs"][0]["data"][0] == text
    messages = triton.InferInput("messages", [1], "BYTES")  # the whole list as one JSON string
    messages.set_data_from_numpy(np.array([json.dumps(WAYANG_CHAT["inputs"][0]["data"])], object))
    result = infer_binary(client, [messages], max_tokens=150)
    assert result.as_numpy("text_output")[0].decode() == text


def test_parameters_stop_tenant_and_per_input_parameters(client, frontend):
    request = {
        "inputs": [text_input("one, two, three", parameters={"max_tokens": 12})],
        "parameters": {"max_tokens": 2, "stop": [", th"], "tenant_id": "acme-corp"},
    }
    body = infer(client, request).json()
    assert body["outputs"][0]["data"] == ["one, two"]  # the input's max_tokens wins
    assert body["outputs"][1]["data"] == ["stop"]
    infer(client, {"inputs": [text_input("x")]}, headers={"X-Tenant-Id": "from-header"})
    exposition = generate_latest(frontend.metrics.registry).decode()
    assert 'tenant="acme-corp"' in exposition and 'tenant="from-header"' in exposition


def test_a_bad_prompt_in_a_batch_starts_none_of_it():
    """The whole batch is checked before any prompt starts, as OpenAI and gRPC do."""
    dispatcher = EchoDispatcher()
    client = make_client(make_frontend(dispatcher))
    reply = infer(client, {"inputs": [text_input("good prompt", "")]})
    assert reply.status_code == 400 and "empty" in reply.json()["error"]
    assert dispatcher.num_started == 0


def test_generate_and_generate_stream_agree(client):
    body = {"id": "g1", "text_input": "streaming text", "parameters": {"max_tokens": 9}}
    reply = client.post(f"/v2/models/{MODEL}/generate", json=body).json()
    assert reply["text_output"] == "streaming" and reply["finish_reason"] == "length"
    assert reply["token_count"] == 9 and reply["id"] == "g1" and "ttft_s" in reply["parameters"]
    stream = client.post(f"/v2/models/{MODEL}/versions/1/generate_stream", json=body)
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in stream.text.split("\n\n") if line]
    assert "".join(e["text_output"] for e in events) == reply["text_output"]
    assert all("finish_reason" not in e for e in events[:-1])
    assert events[-1]["finish_reason"] == "length" and "e2e_s" in events[-1]["parameters"]
    top_level = {"text_input": "abcdef", "max_tokens": 3}  # TRT-LLM style: parameters as inputs
    reply = client.post(f"/v2/models/{MODEL}/generate", json=top_level).json()
    assert reply["text_output"] == "abc"


def test_a_failure_mid_stream_ends_with_an_error_event():
    client = make_client(
        make_frontend(EchoDispatcher(fail=WorkerError("decode worker died"), fail_after=2))
    )
    body = {"text_input": "abcdef", "parameters": {"max_tokens": 5}}
    reply = client.post(f"/v2/models/{MODEL}/generate_stream", json=body)
    events = [json.loads(line[6:]) for line in reply.text.split("\n\n") if line]
    assert events[0]["text_output"] == "a" and events[-1] == {"error": "decode worker died"}


def binary_request(body: dict, tail: bytes, size: int | str | None = None) -> tuple[bytes, dict]:
    header = json.dumps(body).encode()
    return header + tail, {HEADER_LENGTH: str(len(header) if size is None else size)}


def bin_input(size: int) -> dict:
    return {"name": "text_input", "datatype": "BYTES", "shape": [1],
            "parameters": {"binary_data_size": size}}  # fmt: skip


GOOD = {"inputs": [text_input("hi")]}
ERROR_CASES = [
    # (method, path suffix, body, headers, status)
    ("GET", "/v2/models/nope", None, {}, 404),
    ("GET", f"/v2/models/{MODEL}/versions/2", None, {}, 404),
    ("GET", f"/v2/models/{MODEL}/versions/2/ready", None, {}, 404),
    ("POST", "/v2/models/nope/infer", GOOD, {}, 404),
    ("POST", f"/v2/models/{MODEL}/versions/7/infer", GOOD, {}, 404),
    ("POST", f"/v2/models/{MODEL}/nonsense", GOOD, {}, 404),
    ("POST", "/v2/repository/index", {}, {}, 404),
    ("POST", "infer", b"{not json", {}, 400),
    ("POST", "infer", b"[1, 2]", {}, 400),
    ("POST", "infer", {}, {}, 400),
    ("POST", "infer", {"inputs": []}, {}, 400),
    ("POST", "infer", {"inputs": ["text_input"]}, {}, 400),
    ("POST", "infer", {"inputs": [{"name": "text_input", "shape": [1], "data": ["x"]}]}, {}, 400),
    ("POST", "infer", {"inputs": [text_input("a", datatype="INT32", data=[1])]}, {}, 400),
    ("POST", "infer", {"inputs": [text_input("a", datatype="STRING")]}, {}, 400),
    ("POST", "infer", {"inputs": [text_input("a", shape=[2])]}, {}, 400),
    ("POST", "infer", {"inputs": [text_input("a", shape="1")]}, {}, 400),
    ("POST", "infer", {"inputs": [text_input("a", data=[5])]}, {}, 400),
    (
        "POST",
        "infer",
        {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]},
        {},
        400,
    ),  # fmt: skip
    ("POST", "infer", {"inputs": [text_input("a", name="image")]}, {}, 400),
    ("POST", "infer", {"inputs": [text_input("a"), text_input("b", name="prompt")]}, {}, 400),
    ("POST", "infer", {"inputs": [text_input("a"), text_input("b")]}, {}, 400),
    ("POST", "infer", {"inputs": [text_input("")]}, {}, 400),
    ("POST", "infer", {"inputs": [text_input("a", name="messages")]}, {}, 400),
    ("POST", "infer", {"inputs": [text_input('{"role": "x"}', name="messages")]}, {}, 400),
    ("POST", "infer", {**GOOD, "outputs": [{"name": "logits"}]}, {}, 400),
    ("POST", "infer", {**GOOD, "outputs": {"name": "text_output"}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": []}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"temperature": -1}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"temperature": "hot"}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"max_tokens": "many"}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"max_tokens": 0}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"max_tokens": 1000}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"top_p": 1.5}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"top_k": 2**40}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"seed": -(2**63) - 1}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"stop": 5}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"stop": [""]}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"ignore_eos": "maybe"}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"min_tokens": 99}}, {}, 400),
    ("POST", "infer", {**GOOD, "parameters": {"tenant_id": 7}}, {}, 400),
    ("POST", "infer", *binary_request({"inputs": [bin_input(6)]}, pack_bytes(["hi"]), "x"), 400),
    ("POST", "infer", *binary_request({"inputs": [bin_input(6)]}, pack_bytes(["hi"]), 999), 400),
    ("POST", "infer", *binary_request({"inputs": [bin_input(60)]}, pack_bytes(["hi"])), 400),
    ("POST", "infer", *binary_request({"inputs": [bin_input(6)]}, pack_bytes(["hi"]) + b"!"), 400),
    ("POST", "infer", *binary_request({"inputs": [bin_input(3)]}, b"\x09\x00\x00"), 400),
    ("POST", "infer", *binary_request({"inputs": [bin_input(5)]}, b"\x09\x00\x00\x00a"), 400),
    ("POST", "infer", *binary_request({"inputs": [bin_input(5)]}, b"\x01\x00\x00\x00\xff"), 400),
    ("POST", "infer", b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, 400),
    ("POST", "infer", json.dumps(GOOD).encode(), {"Content-Encoding": "br"}, 400),
    ("POST", "generate", {"text_input": ["a", "b"]}, {}, 400),
    ("POST", "generate", {"text_input": "a", "colour": "red"}, {}, 400),
    ("POST", "generate", {"text_input": "a", "parameters": "fast"}, {}, 400),
    ("POST", "generate", {"parameters": {"max_tokens": 3}}, {}, 400),
    ("POST", "generate", {"text_input": 42}, {}, 400),
    ("POST", "generate_stream", {"text_input": "a", "parameters": {"top_p": 0}}, {}, 400),
    ("POST", "generate_stream", {"text_input": ""}, {}, 400),
    ("POST", "generate_stream", b"\xff\xfe", {}, 400),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status"), ERROR_CASES)
def test_errors_are_json_with_the_right_status(
    client, frontend, method, path, body, headers, status
):
    if not path.startswith("/"):
        path = f"/v2/models/{MODEL}/{path}"
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    reply = client.request(method, path, content=content, headers=headers)
    assert reply.status_code == status, reply.text
    assert isinstance(reply.json()["error"], str) and reply.json()["error"]
    assert frontend.generator.scheduler.num_open == 0
    assert infer(client, GOOD).status_code == 200  # and the server still serves


def test_bodies_over_the_limit_are_413(client):
    too_big = b" " * (MAX_BODY_BYTES + 1)
    assert infer(client, too_big).status_code == 413
    chunked = iter([b" " * (1 << 20)] * 17)  # no Content-Length: counted as it arrives
    reply = client.post(f"/v2/models/{MODEL}/infer", content=chunked)
    assert reply.status_code == 413 and "error" in reply.json()
    bomb = gzip.compress(b" " * (MAX_BODY_BYTES + 1))
    assert infer(client, bomb, headers={"Content-Encoding": "gzip"}).status_code == 413


@pytest.mark.parametrize(
    ("error", "status"),
    [(OverloadedError("overloaded: 9 waiting", retry_after_s=3), 503), (WorkerError("gone"), 503)],
)
def test_overload_and_worker_failures_are_503(error, status):
    client = make_client(make_frontend(EchoDispatcher(fail=error)))
    reply = infer(client, GOOD)
    assert reply.status_code == status and reply.json()["error"]
    if isinstance(error, OverloadedError):
        assert reply.headers["retry-after"] == "3"
    stream = client.post(f"/v2/models/{MODEL}/generate_stream", json={"text_input": "hello"})
    assert stream.status_code == status and stream.json()["error"]


@pytest.mark.parametrize("endpoint", ["infer", "generate", "generate_stream"])
def test_a_client_that_leaves_cancels_the_generation(endpoint):
    dispatcher = EchoDispatcher(delay_s=0.01)
    app = Starlette(routes=kserve_rest.routes(make_frontend(dispatcher)))
    params = {"max_tokens": 200, "ignore_eos": True}
    body = (
        {"inputs": [text_input("abc", "def")], "parameters": params}
        if endpoint == "infer"
        else {"text_input": "abc", "parameters": params}
    )

    async def scenario() -> list[dict]:
        sent = await call_asgi(app, f"/v2/models/{MODEL}/{endpoint}", body, 0.2)
        # cleanup may finish in the background, but promptly
        deadline_s = time.monotonic() + 1.0
        while dispatcher.num_open and time.monotonic() < deadline_s:
            await asyncio.sleep(0.005)
        return sent

    sent = asyncio.run(scenario())
    assert dispatcher.num_started == (2 if endpoint == "infer" else 1)
    assert dispatcher.num_open == 0, "a generation was not freed"
    assert 0 < dispatcher.num_tokens < 200, "generation went on after the client left"
    assert sent[0]["status"] in (200, 499)
