from __future__ import annotations

import itertools
import json

import pytest

from coordinator.tool_call_parser import MAX_HEADER_CHARS, ToolCallParser, parse_tool_calls
from coordinator.tool_calls import (
    format_tool_call,
    generic_tool_prompt,
    has_native_tools,
    new_tool_call_id,
    plan_tools,
    prompt_messages,
)
from disagg.errors import InvalidRequestError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


# --- plan_tools -------------------------------------------------------------------------


def test_no_tools_means_no_constraint():
    plan = plan_tools({})
    assert plan.constraint is None and plan.tools == []


def test_auto_allows_text_or_any_tool():
    plan = plan_tools({"tools": [WEATHER, TIME]})
    spec = plan.constraint
    assert spec.kind == "tool_calls" and not spec.is_tool_call_required and spec.is_parallel
    assert [t.name for t in spec.tools] == ["get_weather", "get_time"]
    assert spec.tools[1].parameters == {"type": "object"}


def test_none_offers_nothing():
    plan = plan_tools({"tools": [WEATHER], "tool_choice": "none"})
    assert plan.constraint is None and plan.tools == []


def test_required_and_single_call():
    plan = plan_tools(
        {"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False}
    )
    assert plan.constraint.is_tool_call_required and not plan.constraint.is_parallel
    assert "at least one" in plan.instruction and "at most one" in plan.instruction


def test_named_choice_keeps_only_that_tool():
    choice = {"type": "function", "function": {"name": "get_time"}}
    plan = plan_tools({"tools": [WEATHER, TIME], "tool_choice": choice})
    assert [t.name for t in plan.constraint.tools] == ["get_time"]
    assert plan.constraint.is_tool_call_required
    assert ConstraintRoundTrip.holds(plan.constraint)


class ConstraintRoundTrip:
    @staticmethod
    def holds(spec) -> bool:
        from disagg.grammar.spec import ConstraintSpec

        return ConstraintSpec.from_wire(spec.to_wire()).to_wire() == spec.to_wire()


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"tools": {"a": 1}}, "tools", "must be a list"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools", "needs a name"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools", "needs a name"),
        ({"tools": [{"type": "retrieval"}]}, "tools", "function tool"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools",
            "parameters",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope'",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "must be"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ],
)
def test_bad_tool_fields_are_400s_naming_the_field(body, param, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        plan_tools(body)
    assert info.value.param == param


# --- prompts ----------------------------------------------------------------------------


def test_native_template_detection():
    class Template:
        chat_template = "{% if tools %}{{ tools | tojson }}{% endif %}"

    class Plain:
        chat_template = "{{ messages }}"

    assert has_native_tools(Template()) and not has_native_tools(Plain())


def test_generic_prompt_lists_tools_and_the_format():
    plan = plan_tools({"tools": [WEATHER], "tool_choice": "required"})
    text = generic_tool_prompt(plan)
    assert json.dumps(WEATHER["function"]) in text
    assert "<tool_call>" in text and "</tool_call>" in text
    assert text.endswith("You must call at least one function.")


def test_generic_messages_merge_the_system_prompt_and_render_tool_turns():
    plan = plan_tools({"tools": [WEATHER]})
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    out = prompt_messages(messages, plan, is_native=False)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\nYou can call")
    assert out[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert out[3] == {"role": "user", "content": "<tool_response>\n18C\n</tool_response>"}


def test_generic_prompt_is_inserted_without_a_system_message():
    out = prompt_messages([{"role": "user", "content": "hi"}], plan_tools({"tools": [TIME]}), False)
    assert [m["role"] for m in out] == ["system", "user"]


def test_native_messages_get_object_arguments():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    out = prompt_messages(
        [{"role": "assistant", "content": None, "tool_calls": [call]}], plan_tools({}), True
    )
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert out[0]["content"] == ""


@pytest.mark.parametrize(
    "message",
    [
        {"role": "tool", "content": "18C"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "f", "arguments": "{"}}],
        },
    ],
)
def test_bad_tool_turns_are_400s_on_messages(message):
    with pytest.raises(InvalidRequestError) as info:
        prompt_messages([message], plan_tools({}), is_native=False)
    assert info.value.param == "messages"


def test_tool_call_ids_look_like_openai_ids():
    first, second = new_tool_call_id(), new_tool_call_id()
    assert first.startswith("call_") and len(first) == 29 and first != second


# --- parsing ----------------------------------------------------------------------------

TWO_CALLS = (
    "Let me check.\n"
    + format_tool_call({"function": {"name": "get_weather", "arguments": {"city": "Paris"}}})
    + "\n"
    + format_tool_call({"function": {"name": "get_time", "arguments": {}}})
)


def test_parse_whole_text():
    content, calls = parse_tool_calls(TWO_CALLS, _ids())
    assert content == "Let me check."
    assert calls == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]


def test_plain_text_has_no_calls():
    assert parse_tool_calls("Just text, <tool and all.") == ("Just text, <tool and all.", [])


def test_calls_only_have_null_content():
    content, calls = parse_tool_calls(TWO_CALLS.split("\n", 1)[1], _ids())
    assert content is None and len(calls) == 2


def _stream(text: str, size: int) -> tuple[str, list[dict]]:
    parser = ToolCallParser(_ids())
    content, deltas = "", []
    for start in range(0, len(text), size):
        delta = parser.push(text[start : start + size])
        content += delta.content
        deltas += delta.tool_calls
    tail = parser.finish()
    return content + tail.content, deltas + tail.tool_calls


def _assemble(deltas: list[dict]) -> list[dict]:
    """What the OpenAI SDK's stream helper does with delta.tool_calls."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        call = calls.setdefault(delta["index"], {"function": {"name": "", "arguments": ""}})
        if "id" in delta:
            call["id"], call["type"] = delta["id"], delta["type"]
        call["function"]["name"] += delta["function"].get("name", "")
        call["function"]["arguments"] += delta["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_deltas_assemble_to_the_whole_text_parse(size):
    content, deltas = _stream(TWO_CALLS, size)
    assert content.strip() == "Let me check."
    assert "<" not in content
    _, calls = parse_tool_calls(TWO_CALLS, _ids())
    assert _assemble(deltas) == calls
    opening = [d for d in deltas if "id" in d]
    assert [d["index"] for d in opening] == [0, 1]
    assert all(d["function"]["arguments"] == "" for d in opening)


def test_arguments_stream_incrementally():
    _, deltas = _stream(TWO_CALLS, 1)
    chunks = [d["function"]["arguments"] for d in deltas if d["index"] == 0 and "id" not in d]
    assert len(chunks) > 5 and "".join(chunks) == '{"city": "Paris"}'


def test_an_unclosed_call_keeps_its_arguments():
    whole = format_tool_call({"function": {"name": "get_weather", "arguments": {"city": "Pa"}}})
    text = whole[: whole.index('"Pa"') + 3]
    content, calls = parse_tool_calls(text, _ids())
    assert content is None
    assert calls[0]["function"]["arguments"] == '{"city": "Pa'


def test_a_tag_without_a_call_header_is_content():
    text = "<tool_call>" + "x" * (MAX_HEADER_CHARS + 1)
    assert parse_tool_calls(text) == (text, [])


def _chunk(index: int, delta: dict, finish_reason: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [choice],
    }


@pytest.mark.parametrize("size", [1, 5])
def test_the_openai_sdk_stream_helper_assembles_the_same_calls(size):
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    tools = [
        WEATHER,
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    state = ChatCompletionStreamState(input_tools=tools)
    state.handle_chunk(ChatCompletionChunk.model_validate(_chunk(0, {"role": "assistant"})))
    parser = ToolCallParser(_ids())
    pieces = [TWO_CALLS[i : i + size] for i in range(0, len(TWO_CALLS), size)]
    for delta in [*(parser.push(p) for p in pieces), parser.finish()]:
        body = {"content": delta.content} if delta.content else {}
        if delta.tool_calls:
            body["tool_calls"] = delta.tool_calls
        if body:
            state.handle_chunk(ChatCompletionChunk.model_validate(_chunk(0, body)))
    state.handle_chunk(ChatCompletionChunk.model_validate(_chunk(0, {}, "tool_calls")))
    message = state.get_final_completion().choices[0].message
    _, expected = parse_tool_calls(TWO_CALLS, _ids())
    assembled = [
        {
            "id": c.id,
            "type": c.type,
            "function": {"name": c.function.name, "arguments": c.function.arguments},
        }
        for c in message.tool_calls
    ]
    assert assembled == expected
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert message.content.strip() == "Let me check."
