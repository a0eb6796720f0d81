"""The official `openai` SDK, unchanged, against the cluster: API shapes and behaviour on the
in-process cluster (tiny model), token-exactness and a prefill-time disconnect on a real
`disagg serve` with the default model (slow)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import threading
import urllib.request

import openai
import pytest

from disagg.model.tokenizer import apply_chat_template, encode_prompt
from tests.cluster_harness import ServeProcess, post_json, wait_until
from tests.helpers import reference_tokens
from tests.inprocess_cluster import TINY_MODEL_NAME

MODEL = TINY_MODEL_NAME
REAL_MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def serve(inprocess_cluster):
    return inprocess_cluster


@pytest.fixture(scope="module")
def client(serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def real_serve():
    with ServeProcess("--prefill-workers", "1", "--decode-workers", "1") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def real_client(real_serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{real_serve.url}/v1", api_key="unused", max_retries=0)


def greedy_references(loaded) -> dict[str, tuple[str, int, int]]:
    """transformers' greedy text and token counts for the completion and the chat prompt."""
    tok = loaded.tokenizer
    out = {}
    for key, ids in (
        ("completion", encode_prompt(tok, PROMPT)),
        ("chat", apply_chat_template(tok, CHAT)),
    ):
        tokens = reference_tokens(loaded.model, ids, NEW_TOKENS)
        out[key] = (tok.decode(tokens, skip_special_tokens=True), len(tokens), len(ids))
    return out


@pytest.fixture(scope="module")
def expected(tiny_fp32) -> dict[str, tuple[str, int, int]]:
    return greedy_references(tiny_fp32)


@pytest.fixture(scope="module")
def real_expected(default_fp32) -> dict[str, tuple[str, int, int]]:
    return greedy_references(default_fp32)


def test_the_seeds_bridge_request_works_as_written(serve):
    """The OpenAI bridge seed's curl example: no model field, max_tokens 100."""
    status, reply = post_json(
        f"{serve.url}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 100},
    )
    assert status == 200 and reply["choices"][0]["message"]["content"]
    with urllib.request.urlopen(f"{serve.url}/health", timeout=10) as response:
        assert response.status == 200 and json.load(response)["status"] == "ok"


def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def check_completion(client: openai.OpenAI, model: str, expected: dict) -> None:
    text, num_tokens, num_prompt = expected["completion"]
    reply = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0
    )
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
    assert reply.choices[0].text == text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (num_prompt, num_tokens)


def check_chat(client: openai.OpenAI, model: str, expected: dict) -> str:
    text, num_tokens, num_prompt = expected["chat"]
    reply = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=NEW_TOKENS, temperature=0
    )
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.usage.completion_tokens == num_tokens and reply.usage.prompt_tokens == num_prompt
    stream = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=NEW_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == num_tokens
    return text


def test_completion_equals_transformers_with_exact_usage(client, expected):
    check_completion(client, MODEL, expected)


def test_chat_equals_transformers_streamed_and_not(client, expected):
    check_chat(client, MODEL, expected)


@pytest.mark.slow
def test_real_model_completion_over_the_wire_equals_transformers(real_client, real_expected):
    check_completion(real_client, REAL_MODEL, real_expected)


@pytest.mark.slow
def test_real_model_chat_over_the_wire_equals_transformers(real_client, real_expected):
    assert "Paris" in check_chat(real_client, REAL_MODEL, real_expected)


def test_async_client_streams_completions(serve, expected):
    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0)
        stream = await client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    assert asyncio.run(run()) == expected["completion"][0]


def test_n_and_prompt_lists_run_as_parallel_sequences(client, expected):
    reply = client.completions.create(
        model=MODEL, prompt=[PROMPT, "def fib(n):"], n=2, max_tokens=8, temperature=0
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == reply.choices[1].text  # greedy: the same twice
    assert (
        reply.choices[0].text
        == client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
        .choices[0]
        .text
    )
    # NOTE: one sequence at a time, so both runs see the same batches: float32 logits differ
    # in their last bits with the batch's size and layout, and this random-weight model's
    # near-flat distribution turns any such difference into another sample.
    sampled = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, seed=7)
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, seed=7)
    assert sampled.choices[0].text == again.choices[0].text
    other = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, seed=8)
    assert other.choices[0].text != sampled.choices[0].text, "the seed picks the draw"


def test_logprobs_in_both_shapes(client):
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and all(len(top) == 3 for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == reply.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == max(top.logprob for top in t.top_logprobs) for t in content)


BAD = [
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_inputs_get_openai_errors_and_leak_nothing(serve, path, body, status, param):
    code, reply = post_json(f"{serve.url}{path}", body)
    assert code == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["param"] == param and reply["error"]["message"]
    serve.wait_all_blocks_free()


def test_malformed_and_oversized_bodies(serve):
    for raw in (b"{not json", b"[1, 2]"):
        request = urllib.request.Request(
            f"{serve.url}/v1/completions", raw, {"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=60)
        assert info.value.code == 400
        assert "message" in json.load(info.value)["error"]
    # Over the limit: refused from the declared length, before the body is read.
    connection = http.client.HTTPConnection("127.0.0.1", serve.http_port, timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(64 << 20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "message" in json.load(response)["error"]
    connection.close()


def test_client_disconnect_frees_kv_within_a_second(serve):
    body = json.dumps(
        {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    ).encode()
    request = urllib.request.Request(
        f"{serve.url}/v1/completions", body, {"Content-Type": "application/json"}
    )
    response = urllib.request.urlopen(request, timeout=60)
    for _ in range(3):
        response.readline()
    wait_until(lambda: any(w["load"] for w in serve.cluster()["workers"]), 10, "the request to run")
    response.close()
    serve.wait_all_blocks_free(timeout_s=2.5)  # a heartbeat (1 s) after the worker freed it


@pytest.mark.slow
def test_disconnect_during_prefill_frees_the_handle_promptly(real_serve):
    """Before the first token only Free can release the decode worker's handle; the
    prefill worker drops the sequence when its current forward step ends."""
    long_prompt = " ".join(["word"] * 1500)
    body = json.dumps({"prompt": long_prompt, "max_tokens": 50, "stream": True}).encode()
    request = urllib.request.Request(
        f"{real_serve.url}/v1/completions", body, {"Content-Type": "application/json"}
    )
    response = urllib.request.urlopen(request, timeout=60)

    def decode_blocks_in_use() -> bool:
        return any(
            w["free_kv_blocks"] < w["total_kv_blocks"]
            for w in real_serve.cluster()["workers"]
            if w["role"] == "decode"
        )

    wait_until(decode_blocks_in_use, 10, "the handle to be allocated")
    response.close()
    wait_until(lambda: not decode_blocks_in_use(), 2.5, "the decode worker to free the handle")
    real_serve.wait_all_blocks_free(timeout_s=30)


def test_metrics_count_requests_tokens_and_tenants(serve, client):
    def scrape() -> str:
        with urllib.request.urlopen(f"{serve.url}/metrics", timeout=10) as response:
            return response.read().decode()

    def value(text: str, name: str, tenant: str) -> float:
        pattern = rf'^{name}\{{model="{MODEL}",tenant="{tenant}"\}} (\S+)$'
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    before = scrape()
    tokens = 0
    for _ in range(3):
        tokens += client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, user="acme"
        ).usage.completion_tokens
    after = scrape()
    assert (
        value(after, "disagg_time_to_first_token_seconds_count", "acme")
        - value(before, "disagg_time_to_first_token_seconds_count", "acme")
        == 3
    )
    assert (
        value(after, "disagg_generation_tokens_total", "acme")
        - value(before, "disagg_generation_tokens_total", "acme")
        == tokens
    )
    assert (
        value(after, "disagg_time_between_tokens_seconds_count", "acme")
        - value(before, "disagg_time_between_tokens_seconds_count", "acme")
        == tokens - 3
    )
    for name in (
        "disagg_kv_blocks_total",
        "disagg_kv_blocks_used",
        "disagg_requests_running",
        "disagg_e2e_request_latency_seconds_bucket",
        "disagg_kv_transfer_bytes_total",
        "disagg_queue_time_seconds_count",
        "disagg_prefill_time_seconds_count",
        "disagg_kv_transfer_seconds_count",
        "disagg_prompt_tokens_total",
        "disagg_requests_waiting",
    ):
        assert name in after, name


def test_concurrent_streams_from_threads_all_finish(client, expected):
    texts: list[str] = []

    def one() -> None:
        stream = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True
        )
        texts.append("".join(c.choices[0].text for c in stream))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert texts == [expected["completion"][0]] * 6


def test_greedy_text_is_the_same_over_openai_kserve_rest_and_kserve_grpc(serve, client):
    import numpy as np
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    params = {"max_tokens": NEW_TOKENS, "temperature": 0}
    openai_text = client.completions.create(model=MODEL, prompt=PROMPT, **params).choices[0].text
    texts = {}
    for name, module, url in (
        ("rest", triton_http, f"127.0.0.1:{serve.http_port}"),
        ("grpc", triton_grpc, f"127.0.0.1:{serve.grpc_port}"),
    ):
        text_input = module.InferInput("text_input", [1], "BYTES")
        text_input.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
        result = module.InferenceServerClient(url).infer(MODEL, [text_input], parameters=params)
        texts[name] = result.as_numpy("text_output")[0].decode()
    assert texts == {"rest": openai_text, "grpc": openai_text}
