"""Penalties, logit_bias and logprobs end to end on the in-process cluster (tiny model): the
tokens the engine would choose, and OpenAI's exact logprob shapes, streamed and not."""

from __future__ import annotations

import json
import urllib.request

import pytest

from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.model.tokenizer import encode_prompt
from tests.coordinator.front_door import post

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Hi"}]
EMOJI = "🙂"


@pytest.fixture(scope="module")
def serve(inprocess_cluster):
    return inprocess_cluster


@pytest.fixture(scope="module")
def engine(tiny_fp32) -> LLMEngine:
    return LLMEngine(EngineConfig(block_size=16, num_kv_blocks=64), loaded=tiny_fp32)


@pytest.fixture(scope="module")
def half_emoji(tiny_fp32) -> int:
    """A token that is half of one UTF-8 character: alone it decodes to U+FFFD."""
    token_id = tiny_fp32.tokenizer(EMOJI)["input_ids"][0]
    assert tiny_fp32.tokenizer.decode([token_id]) == "\ufffd"
    return token_id


def complete(serve, **fields: object) -> dict:
    body = {"model": serve.model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **fields}
    status, reply, _ = post(f"{serve.url}/v1/completions", body)
    assert status == 200, reply
    return reply


def chat(serve, **fields: object) -> dict:
    body = {"model": serve.model, "messages": CHAT, "max_tokens": 3, "temperature": 0, **fields}
    status, reply, _ = post(f"{serve.url}/v1/chat/completions", body)
    assert status == 200, reply
    return reply


def stream_chunks(serve, path: str, body: dict) -> list[dict]:
    data = json.dumps({"model": serve.model, **body, "stream": True}).encode()
    request = urllib.request.Request(
        f"{serve.url}{path}", data, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        lines = response.read().decode().splitlines()
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1] if json.loads(e)["choices"]]


def test_penalties_choose_what_the_engine_chooses(serve, engine, tiny_fp32):
    """A bias of 10 makes the greedy first token the favourite everywhere (the tiny model's
    logits span a few units); the penalties then hold its repeats down, as the engine does."""
    (favourite,) = engine_tokens(engine, tiny_fp32.tokenizer, 1)
    bias = ((favourite, 10.0),)
    steering = {"presence_penalty": 2.0, "frequency_penalty": 2.0, "repetition_penalty": 1.4}
    reply = complete(serve, max_tokens=12, logit_bias={str(favourite): 10.0}, **steering)
    tokens = engine_tokens(engine, tiny_fp32.tokenizer, 12, logit_bias=bias, **steering)
    assert reply["choices"][0]["text"] == tiny_fp32.tokenizer.decode(tokens)
    biased_only = engine_tokens(engine, tiny_fp32.tokenizer, 12, logit_bias=bias)
    assert 1 <= tokens.count(favourite) < biased_only.count(favourite)
    serve.wait_all_blocks_free()


def engine_tokens(engine, tokenizer, max_tokens: int, **params: object) -> list[int]:
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, **params)
    (seq,) = engine.generate([encode_prompt(tokenizer, PROMPT)], greedy)
    return seq.output_token_ids


def test_logit_bias_minus_100_bans_the_greedy_token_and_plus_100_forces_one(
    serve, engine, tiny_fp32, half_emoji
):
    (greedy_id,) = engine_tokens(engine, tiny_fp32.tokenizer, 1)
    ban = ((greedy_id, -100.0),)
    banned_ids = engine_tokens(engine, tiny_fp32.tokenizer, 3, logit_bias=ban)
    assert banned_ids[0] != greedy_id
    banned = complete(serve, max_tokens=3, logit_bias={str(greedy_id): -100})
    assert banned["choices"][0]["text"] == tiny_fp32.tokenizer.decode(banned_ids)
    forced = chat(serve, logit_bias={str(half_emoji): 100}, logprobs=True)
    content = forced["choices"][0]["logprobs"]["content"]
    assert [entry["bytes"] for entry in content] == [list(EMOJI.encode()[:2])] * 3
    serve.wait_all_blocks_free()


def joined_content(chunks: list[dict]) -> list[dict]:
    return [
        e
        for c in chunks
        if c["choices"][0]["logprobs"]
        for e in c["choices"][0]["logprobs"]["content"]
    ]


def test_chat_logprobs_in_openai_shape_streamed_and_not(serve):
    fields = {"max_tokens": 4, "logprobs": True, "top_logprobs": 3}
    reply = chat(serve, **fields)
    logprobs = reply["choices"][0]["logprobs"]
    assert set(logprobs) == {"content", "refusal"} and logprobs["refusal"] is None
    content = logprobs["content"]
    assert len(content) == reply["usage"]["completion_tokens"] == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert [set(top) for top in entry["top_logprobs"]] == [{"token", "logprob", "bytes"}] * 3
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]  # greedy: the top one
        assert entry["logprob"] >= entry["top_logprobs"][1]["logprob"]
    text = bytes(b for entry in content for b in entry["bytes"]).decode()
    assert text == reply["choices"][0]["message"]["content"]
    body = {"messages": CHAT, "temperature": 0, **fields}
    streamed = joined_content(stream_chunks(serve, "/v1/chat/completions", body))
    assert streamed == content
    without_top = chat(serve, max_tokens=2, logprobs=True)["choices"][0]["logprobs"]["content"]
    assert [entry["top_logprobs"] for entry in without_top] == [[], []]
    serve.wait_all_blocks_free()


def test_completion_logprobs_in_openai_shape_streamed_and_not(serve):
    fields = {"max_tokens": 6, "logprobs": 2, "temperature": 1.0, "seed": 7}
    reply = complete(serve, **fields)
    logprobs = reply["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    tokens = logprobs["tokens"]
    assert len(tokens) == 6 and "".join(tokens) == reply["choices"][0]["text"]
    for token, value, top in zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert top[token] == value and 1 <= len(top) <= 3  # up to logprobs + 1: the sampled one
        assert list(top.values()) == sorted(top.values(), reverse=True)
    assert logprobs["text_offset"] == [len("".join(tokens[:i])) for i in range(6)]
    body = {"prompt": PROMPT, **fields}
    chunks = [c["choices"][0]["logprobs"] for c in stream_chunks(serve, "/v1/completions", body)]
    assert [t for c in chunks for t in c["tokens"]] == tokens
    assert [o for c in chunks for o in c["text_offset"]] == logprobs["text_offset"]
    serve.wait_all_blocks_free()


def test_alternatives_a_constraint_rules_out_are_minus_9999_not_a_500(serve):
    reply = complete(serve, max_tokens=4, logprobs=5, guided_choice=["yes", "no"])
    tops = reply["choices"][0]["logprobs"]["top_logprobs"]
    assert any(-9999.0 in top.values() for top in tops), tops  # after "ye" only "s" may come
    lp = chat(serve, logprobs=True, top_logprobs=20, guided_choice=["yes", "no"])
    assert lp["choices"][0]["logprobs"]["content"][0]["top_logprobs"][-1]["logprob"] == -9999.0
    serve.wait_all_blocks_free()
