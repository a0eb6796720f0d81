"""Structured output and tool calls end to end on the in-process cluster (tiny model).

Random weights cannot finish a free string, so the schemas here are bounded (enums,
integers with bounds, regexes of fixed length): the grammar itself must bring every output
to its end, and every output must validate. Greedy output under a grammar equals the
single-process reference (transformers with the same masks), disaggregated and colocated.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from disagg.grammar import ConstraintSpec, GrammarCompiler, GrammarState
from disagg.model.loader import load_model_info
from disagg.model.tokenizer import encode_prompt
from tests.cluster_harness import post_json
from tests.coordinator.test_kserve_rest_cluster import sse_events
from tests.disagg.grammar.reference import constrained_greedy
from tests.inprocess_cluster import InProcessCluster

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "age": {"type": "integer", "minimum": 18, "maximum": 120},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "age", "ok"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "maximum": 9}},
            "required": ["unit", "days"],
        },
    },
}
CHAT = [{"role": "user", "content": "Weather in Paris?"}]
GREEDY = {"temperature": 0, "max_tokens": 60}


@pytest.fixture(scope="module")
def serve(inprocess_cluster):
    return inprocess_cluster


@pytest.fixture(scope="module")
def client(serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", max_retries=0)


class ColocatedCluster(InProcessCluster):
    """The coordinator and one worker that runs both phases."""

    def _roles_to_run(self) -> list:
        from coordinator import main as coordinator_main
        from decode_worker import main as decode_main
        from disagg.config import CoordinatorConfig, DecodeWorkerConfig, EngineConfig

        engine = EngineConfig(**self._engine)
        worker = self.worker_config("colocated-0")
        return [
            coordinator_main.run(CoordinatorConfig(**self._coordinator)),
            decode_main.run(engine, worker, DecodeWorkerConfig(kv_transport="ipc", colocated=True)),
        ]


def test_chat_json_schema_validates_streamed_and_not(client, serve):
    reply = client.chat.completions.create(
        model=serve.model, messages=CHAT, response_format=RESPONSE_FORMAT, **GREEDY
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = client.chat.completions.create(
        model=serve.model, messages=CHAT, response_format=RESPONSE_FORMAT, stream=True, **GREEDY
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    serve.wait_all_blocks_free()


def test_mixed_batch_of_constrained_and_free_requests(serve):
    """n=4 with a choice constraint alongside free completions, all at once."""
    import concurrent.futures

    bodies = [
        {"prompt": f"pick {i}", "n": 4, "guided_choice": ["alpha", "beta"], **GREEDY}
        if i % 2
        else {"prompt": f"say {i}", "n": 4, "temperature": 0.8, "seed": i, "max_tokens": 8}
        for i in range(4)
    ]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: post_json(f"{serve.url}/v1/completions", b), bodies))
    for i, (status, reply) in enumerate(results):
        assert status == 200, reply
        for choice in reply["choices"]:
            if i % 2:
                assert choice["text"] in ("alpha", "beta") and choice["finish_reason"] == "stop"
            else:
                assert choice["finish_reason"] == "length"
    serve.wait_all_blocks_free()


def test_kserve_guided_parameters_on_generate_and_stream(serve):
    base = f"{serve.url}/v2/models/{serve.model}"
    body = {"text_input": "code:", "parameters": {**GREEDY, "guided_regex": "[A-Z]{3}-[0-9]{2}"}}
    status, reply = post_json(f"{base}/generate", body)
    assert status == 200 and re.fullmatch("[A-Z]{3}-[0-9]{2}", reply["text_output"]), reply
    events = list(sse_events(f"{base}/generate_stream", body))
    assert "".join(e["text_output"] for e in events) == reply["text_output"]
    schema_body = {"text_input": "x", "parameters": {**GREEDY, "guided_json": json.dumps(SCHEMA)}}
    status, reply = post_json(f"{base}/generate", schema_body)
    assert status == 200
    jsonschema.validate(json.loads(reply["text_output"]), SCHEMA)
    serve.wait_all_blocks_free()


def _assert_weather_call(call) -> None:
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_tool_calls_whole_and_streamed_then_the_answer(client, serve):
    # NOTE: one call: random weights would chain parallel calls until max_tokens
    ask = dict(
        model=serve.model,
        messages=CHAT,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    reply = client.chat.completions.create(**ask, **GREEDY)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    _assert_weather_call(call)
    with client.chat.completions.stream(**ask, **GREEDY) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [c.function.arguments for c in streamed.message.tool_calls] == [
        c.function.arguments for c in choice.message.tool_calls
    ]
    followup = [
        *CHAT,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    answer = client.chat.completions.create(
        model=serve.model, messages=followup, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason in ("stop", "length")
    serve.wait_all_blocks_free()


BAD = [
    ({"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}}, "response_format"),
    ({"messages": CHAT, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
    ({"messages": CHAT, "guided_regex": "(unclosed"}, "guided_regex"),
    ({"messages": CHAT, "tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), BAD)
def test_bad_constraints_are_400s_naming_the_field(serve, body, param):
    status, reply = post_json(f"{serve.url}/v1/chat/completions", body)
    assert status == 400 and reply["error"]["param"] == param, reply
    serve.wait_all_blocks_free()


def test_kserve_bad_regex_is_a_400(serve):
    base = f"{serve.url}/v2/models/{serve.model}"
    body = {"text_input": "x", "parameters": {"guided_regex": "[a-"}}
    status, reply = post_json(f"{base}/generate", body)
    assert status == 400 and "guided_regex" in reply["error"], reply


@pytest.fixture(scope="module")
def reference_text(tiny_model_dir, tiny_fp32):
    """What the single-process reference writes for PROMPT under SPEC, greedily."""
    info = load_model_info(str(tiny_model_dir))
    vocab_size = tiny_fp32.model.lm_head.weight.shape[0]
    compiler = GrammarCompiler(info.tokenizer, vocab_size, sorted(info.eos_token_ids))
    state = GrammarState(compiler.compile(SPEC))
    prompt_ids = encode_prompt(info.tokenizer, PROMPT)
    ids = constrained_greedy(tiny_fp32.model, prompt_ids, state, vocab_size, 60)
    assert ids[-1] in info.eos_token_ids
    return info.tokenizer.decode(ids[:-1])


PROMPT = "A person:"
SPEC = ConstraintSpec("json_schema", schema=SCHEMA)


def _guided_text(cluster) -> str:
    status, reply = cluster.completion(PROMPT, guided_json=SCHEMA, **GREEDY)
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] == "stop"
    return reply["choices"][0]["text"]


def test_greedy_under_a_grammar_equals_the_reference_disaggregated_and_colocated(
    serve, tiny_model_dir, reference_text
):
    assert _guided_text(serve) == reference_text
    with ColocatedCluster(tiny_model_dir) as colocated:
        assert _guided_text(colocated) == reference_text
        colocated.wait_all_blocks_free()
