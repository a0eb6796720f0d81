"""KServe V2 gRPC end to end: `tritonclient.grpc` against the in-process cluster (tiny model),
and token-exactness on a real `disagg serve` with the default model (slow)."""

from __future__ import annotations

import json
import queue
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from coordinator.kserve_grpc import FINAL_FLAG
from disagg.model.tokenizer import apply_chat_template, encode_prompt
from tests.cluster_harness import ServeProcess, wait_until
from tests.helpers import reference_text, reference_tokens

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
