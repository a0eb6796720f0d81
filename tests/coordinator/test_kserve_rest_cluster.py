"""KServe V2 REST end to end: every endpoint on the in-process cluster (tiny model), and
tritonclient.http with its defaults against a real `disagg serve` on the default model (slow)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton

from disagg.model.loader import DEFAULT_MODEL_NAME
from disagg.model.tokenizer import encode_prompt
from tests.cluster_harness import ServeProcess, post_json, wait_until
from tests.coordinator.test_kserve_rest import GOOD, WAYANG_CHAT, text_input
from tests.helpers import reference_text

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Photosynthesis is the process"]
NEW_TOKENS = 16
SERVED_NAME = DEFAULT_MODEL_NAME  # what `disagg serve` calls the default model


@pytest.fixture(scope="module")
def serve(inprocess_cluster):
    return inprocess_cluster


@pytest.fixture(scope="module")
def real_serve():
    with ServeProcess("--prefill-workers", "1", "--decode-workers", "1") as process:
        yield process


def greedy_texts(loaded) -> dict[str, str]:
    tok = loaded.tokenizer
    return {p: reference_text(loaded, encode_prompt(tok, p), NEW_TOKENS) for p in PROMPTS}


@pytest.fixture(scope="module")
def expected(tiny_fp32) -> dict[str, str]:
    return greedy_texts(tiny_fp32)


def greedy_inputs(*prompts: str) -> list[triton.InferInput]:
    tensor = triton.InferInput("text_input", [len(prompts)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=object))
    return [tensor]


GREEDY = {"max_tokens": NEW_TOKENS, "temperature": 0}


@pytest.mark.slow
def test_tritonclient_with_defaults_gets_transformers_greedy_text(real_serve, default_fp32):
    serve, expected = real_serve, greedy_texts(default_fp32)
    client = triton.InferenceServerClient(f"127.0.0.1:{serve.http_port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(SERVED_NAME)
    assert client.get_model_metadata(SERVED_NAME)["outputs"][0]["name"] == "text_output"
    assert "generate" in client.get_server_metadata()["extensions"]
    result = client.infer(
        SERVED_NAME,
        inputs=greedy_inputs(PROMPTS[0]),
        outputs=[triton.InferRequestedOutput("text_output")],
        parameters=GREEDY,
    )
    assert result.as_numpy("text_output")[0].decode() == expected[PROMPTS[0]]
    batch = client.infer(SERVED_NAME, inputs=greedy_inputs(*PROMPTS), parameters=GREEDY)
    texts = [t.decode() for t in batch.as_numpy("text_output")]
    assert texts == [expected[p] for p in PROMPTS]
    assert batch.as_numpy("token_count").tolist() == [NEW_TOKENS] * 3
    assert batch.get_response()["parameters"]["kv_bytes"] > 0
    serve.wait_all_blocks_free()


def test_seed_bodies_as_written(serve):
    wayang_prompt = {
        "id": "550e8400-e29b-41d4-a716-446655440000",
        "model_name": "llama3-8b",
        "model_version": "1.0",
        "inputs": [
            {
                "name": "prompt",
                "shape": [1],
                "datatype": "BYTES",
                "data": ["Explain quantum computing in simple terms."],
            }
        ],
        "parameters": {"max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "tenant_id": "acme-corp"},
    }
    wayang_chat = {**WAYANG_CHAT, "parameters": {"max_tokens": 8, "temperature": 0.5}}
    for body in (wayang_prompt, wayang_chat):
        status, reply = post_json(f"{serve.url}/v2/models/{serve.model}/infer", body)
        assert status == 200, reply
        assert reply["id"] == body["id"]
        text_output = next(o for o in reply["outputs"] if o["name"] == "text_output")
        assert isinstance(text_output["data"][0], str) and text_output["data"][0]
    serve.wait_all_blocks_free()


def test_generate_and_generate_stream_over_the_cluster(serve, expected):
    base = f"{serve.url}/v2/models/{serve.model}"
    body = {"text_input": PROMPTS[1], "parameters": GREEDY}
    status, reply = post_json(f"{base}/generate", body)
    assert status == 200 and reply["text_output"] == expected[PROMPTS[1]]
    events = list(sse_events(f"{base}/generate_stream", body))
    assert "".join(e["text_output"] for e in events) == reply["text_output"]
    assert events[-1]["finish_reason"] == reply["finish_reason"]
    serve.wait_all_blocks_free()


def test_bad_requests_over_every_endpoint_leak_nothing(serve):
    base = f"{serve.url}/v2/models/{serve.model}"
    cases = [
        (f"{serve.url}/v2/models/nope/infer", GOOD, 404),
        (f"{base}/versions/3/generate", {"text_input": "a"}, 404),
        (f"{base}/infer", {"inputs": [text_input("a", shape=[3])]}, 400),
        (f"{base}/infer", {**GOOD, "outputs": [{"name": "logits"}]}, 400),
        (f"{base}/infer", {**GOOD, "parameters": {"max_tokens": 100000}}, 400),
        (f"{base}/generate", {"text_input": "a", "parameters": {"temperature": -2}}, 400),
        (f"{base}/generate_stream", {"text_input": "", "parameters": {}}, 400),
        (f"{base}/generate_stream", {"prompt": "a", "parameters": {"top_k": 2**32}}, 400),
    ]
    for url, body, status in cases:
        got, reply = post_json(url, body)
        assert got == status and isinstance(reply["error"], str), (url, body, reply)
    for url in (f"{base}/versions/2", f"{serve.url}/v2/models/nope/ready"):
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(url)
        assert failure.value.code == 404 and json.load(failure.value)["error"]
    serve.wait_all_blocks_free()


def test_leaving_mid_stream_or_mid_infer_frees_the_kv(serve):
    base = f"{serve.url}/v2/models/{serve.model}"
    long = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0}  # ~45 s if left to run
    events = sse_events(f"{base}/generate_stream", {"text_input": "Once", "parameters": long})
    next(events)
    events.close()
    request = json.dumps({"inputs": [text_input("Once upon")], "parameters": long}).encode()
    with socket.create_connection(("127.0.0.1", serve.http_port)) as sock:
        sock.sendall(
            f"POST /v2/models/{serve.model}/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(request)}\r\n\r\n".encode()
            + request
        )
        wait_until(
            lambda: any(w["load"] for w in serve.cluster()["workers"]), 30, "the infer to run"
        )
    try:
        serve.wait_all_blocks_free(timeout_s=10)
    except TimeoutError:
        raise AssertionError(serve.cluster()) from None


def sse_events(url: str, body: dict):
    """The parsed `data:` events of an SSE response; closing the generator disconnects."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: "):
                yield json.loads(line[6:])
