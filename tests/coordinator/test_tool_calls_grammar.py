"""Tool-call grammars and the parser agree: whatever the logits, constrained output parses back
into calls whose arguments validate against their tool's schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from coordinator.tool_call_parser import parse_tool_calls
from coordinator.tool_calls import plan_tools
from disagg.grammar import GrammarCompiler, GrammarState, TokenMasker
from disagg.model.loader import load_model_info

VOCAB_SIZE = 49152
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["c", "f"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["a"],
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def info():
    return load_model_info("default")


@pytest.fixture(scope="module")
def compiler(info):
    return GrammarCompiler(info.tokenizer, VOCAB_SIZE, sorted(info.eos_token_ids))


def _generate(info, compiler, body: dict, seed: int, prefix: str = "") -> str:
    state = GrammarState.from_tokens(
        compiler.compile(plan_tools(body).constraint), info.tokenizer.encode(prefix)
    )
    masker, generator = TokenMasker(VOCAB_SIZE, 1), torch.Generator().manual_seed(seed)
    token_ids = info.tokenizer.encode(prefix)
    for _ in range(300):
        if state.is_terminated:
            break
        logits = torch.randn(1, VOCAB_SIZE, generator=generator)
        masker.apply(logits, [state])
        token_ids.append(int(logits.argmax()))
        assert state.accept_token(token_ids[-1])
    assert state.is_terminated
    return info.tokenizer.decode(token_ids[:-1])


def _check_calls(calls: list[dict], names: set[str]) -> None:
    for call in calls:
        assert call["function"]["name"] in names
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, SCHEMAS[call["function"]["name"]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_calls_parse_and_validate(info, compiler, seed):
    text = _generate(info, compiler, {"tools": TOOLS, "tool_choice": "required"}, seed)
    content, calls = parse_tool_calls(text)
    assert content is None and calls
    _check_calls(calls, set(SCHEMAS))


def test_a_named_single_call(info, compiler):
    body = {
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "add"}},
        "parallel_tool_calls": False,
    }
    content, calls = parse_tool_calls(_generate(info, compiler, body, seed=5))
    assert content is None and len(calls) == 1
    _check_calls(calls, {"add"})


def test_auto_checks_a_call_once_the_model_starts_one(info, compiler):
    text = _generate(
        info, compiler, {"tools": TOOLS, "parallel_tool_calls": False}, 3, "Sure. <tool_call>"
    )
    content, calls = parse_tool_calls(text)
    assert content == "Sure." and len(calls) == 1
    _check_calls(calls, set(SCHEMAS))
