"""Structured output and tool calls on the real default model, through the official SDK.

Slow: real processes. The SDK's `beta.chat.completions.parse` returns a pydantic object; a
tool call, the tool's result and the answer go round trip, whole and streamed; greedy output
under a schema equals the single-process reference (transformers with the same masks).
Colocated against disaggregated is checked on the in-process cluster (fast), where a second
real-model cluster would cost two more model loads.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from disagg.grammar import ConstraintSpec, GrammarCompiler, GrammarState
from disagg.model.tokenizer import apply_chat_template
from tests.cluster_harness import ServeProcess
from tests.disagg.grammar.reference import constrained_greedy

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
}
ASK_PERSON = [{"role": "user", "content": "Describe a French programmer as JSON."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def serve():
    with ServeProcess("--prefill-workers", "1", "--decode-workers", "1") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0)


def test_sdk_parse_returns_the_pydantic_object(client):
    reply = client.beta.chat.completions.parse(
        model=MODEL, messages=ASK_PERSON, response_format=Person, temperature=0, max_tokens=60
    )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person)


def test_tool_call_round_trip_whole_and_streamed(client, serve):
    ask = dict(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    reply = client.chat.completions.create(**ask)
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    with client.chat.completions.stream(**ask) as stream:
        final = stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls
    assert streamed.function.arguments == call.function.arguments
    assert final.choices[0].finish_reason == "tool_calls"
    followup = [
        *ASK_WEATHER,
        reply.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'},
    ]
    answer = dict(model=MODEL, messages=followup, tools=[WEATHER], temperature=0, max_tokens=24)
    whole = client.chat.completions.create(**answer, tool_choice="none")
    assert whole.choices[0].message.content and not whole.choices[0].message.tool_calls
    with client.chat.completions.stream(**answer, tool_choice="none") as stream:
        streamed_answer = stream.get_final_completion()
    assert streamed_answer.choices[0].message.content == whole.choices[0].message.content
    serve.wait_all_blocks_free()


def _guided(cluster: ServeProcess, prompt_ids: list[int]) -> str:
    status, reply = cluster.completion(prompt_ids, guided_json=PERSON, temperature=0, max_tokens=60)
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] == "stop"
    return reply["choices"][0]["text"]


def test_greedy_under_a_schema_is_the_reference(serve, default_fp32):
    tokenizer = default_fp32.tokenizer
    vocab_size = default_fp32.model.lm_head.weight.shape[0]
    compiler = GrammarCompiler(tokenizer, vocab_size, [tokenizer.eos_token_id])
    state = GrammarState(compiler.compile(ConstraintSpec("json_schema", schema=PERSON)))
    prompt_ids = apply_chat_template(tokenizer, ASK_PERSON)
    ids = constrained_greedy(default_fp32.model, prompt_ids, state, vocab_size, 60)
    assert ids[-1] == tokenizer.eos_token_id
    expected = tokenizer.decode(ids[:-1])
    jsonschema.validate(json.loads(expected), PERSON)
    assert _guided(serve, prompt_ids) == expected


SCHEMA_SET = {
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "location": {
                "type": "object",
                "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                "required": ["lat", "lon"],
            },
        },
        "required": ["city", "location"],
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 8},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["tags"],
    },
    "enum": {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad", "calm"]}},
        "required": ["mood"],
    },
    "bounded": {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": 1, "maximum": 10},
            "note": {"type": "string", "maxLength": 10},
        },
        "required": ["score"],
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
    },
}


def test_sixteen_streams_mixing_schemas_and_free_text_all_validate(client):
    """16 chats at once: every schema of the set, greedy and sampled, streamed and not,
    beside free requests. Each constrained output parses and validates; none ends `stop`
    with invalid JSON (a grammar cut short by max_tokens must say `length`)."""
    import concurrent.futures

    def ask(index: int) -> tuple[str | None, str, str]:
        name = list(SCHEMA_SET)[index % len(SCHEMA_SET)] if index < 10 else None
        kwargs: dict = {"max_tokens": 48, "seed": index}
        kwargs["temperature"] = 0 if index % 2 else 0.7
        if name is not None:
            schema = {"name": name, "schema": SCHEMA_SET[name]}
            kwargs["response_format"] = {"type": "json_schema", "json_schema": schema}
        messages = [{"role": "user", "content": f"Give me a {name or 'short story'} as JSON."}]
        if index % 4 < 2:
            reply = client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
            return name, reply.choices[0].message.content, reply.choices[0].finish_reason
        parts, finish = [], ""
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, **kwargs
        )
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return name, "".join(parts), finish

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16)))
    num_validated = 0
    for name, text, finish in results:
        if name is None:
            assert finish in ("stop", "length") and text
            continue
        if finish == "length":
            continue  # allowed: the grammar did not finish within max_tokens
        assert finish == "stop", (name, text, finish)
        jsonschema.validate(json.loads(text), SCHEMA_SET[name])
        num_validated += 1
    assert num_validated >= 5, results
