"""Structured output at the coordinator: each request's constraint, and one compile to check it.

The protocols read their fields into a `ConstraintSpec` (`coordinator.constraints`,
`coordinator.tool_calls`); here the spec joins the request's `SamplingParams` as its wire
string, and `check_constraints` compiles every distinct spec of a request once, on a
process-wide `GrammarCompiler` in a thread of its own (tokenizer set-up takes 1-3 s once, a
cold schema up to ~30 ms: neither may stall the event loop). An unsupported schema or a
regex that does not compile is then a 400 naming the request's field, before any worker
is asked for KV; the workers compile the same wire string again, from their own cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from coordinator.constraints import kserve_constraint, response_format_constraint
from coordinator.generation import GenerationRequest
from coordinator.tool_calls import has_native_tools, plan_tools, prompt_messages
from disagg.engine.sampling_params import SamplingParams
from disagg.errors import InvalidRequestError
from disagg.grammar import ConstraintSpec, GrammarCompiler
from disagg.model.loader import ModelInfo

OPENAI_FIELDS = {
    "json_object": "response_format",
    "json_schema": "response_format",
    "tool_calls": "tools",
}
"""The OpenAI field each kind of constraint comes from, named in a compile error."""
KSERVE_FIELDS = {
    "json_schema": "guided_json",
    "regex": "guided_regex",
    "choice": "guided_choice",
}
"""The KServe parameter each kind of constraint comes from, named in a compile error."""

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-check")
_compilers: dict[int, GrammarCompiler] = {}  # by id(tokenizer); touched only on _executor


@dataclass(frozen=True)
class ChatStructure:
    """What `tools`, `tool_choice` and `response_format` make of one chat request."""

    messages: list[dict]
    """The messages to render (tool turns in the model's format, the tool prompt if needed)."""
    tools: list[dict] | None
    """The tools for a chat template that renders them itself; None otherwise."""
    constraint: ConstraintSpec | None
    has_tools: bool
    """Tools are offered: the output is parsed for tool calls."""


def chat_structure(body: dict, tokenizer: object) -> ChatStructure:
    """Read a chat body's tools and response_format; both constraining at once is a 400."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequestError("messages must be a list of messages", "messages")
    plan = plan_tools(body)
    response_format = output_constraint(body)
    if plan.constraint is not None and response_format is not None:
        raise InvalidRequestError(
            "a request that offers tools cannot also constrain its output", response_format.param
        )
    is_native = has_native_tools(tokenizer)
    rendered = prompt_messages(messages, plan, is_native)
    tools = plan.tools if is_native and plan.tools else None
    constraint = plan.constraint or response_format
    return ChatStructure(rendered, tools, constraint, bool(plan.tools))


def with_constraint(params: SamplingParams, spec: ConstraintSpec | None) -> SamplingParams:
    """`params` carrying `spec` as its wire string (unchanged without one)."""
    if spec is None:
        return params
    return dataclasses.replace(params, constraint=spec.to_wire())


def with_kserve_constraint(params: SamplingParams, parameters: Mapping) -> SamplingParams:
    """`params` with the constraint KServe `parameters` ask for (guided_json/regex/choice)."""
    return with_constraint(params, kserve_constraint(dict(parameters)))


async def check_constraints(
    requests: Sequence[GenerationRequest], model: ModelInfo, fields: Mapping[str, str]
) -> None:
    """Compile each distinct constraint once; InvalidRequestError names its field (`fields`
    maps a spec's kind to the protocol's field name)."""
    wires = {r.params.constraint for r in requests if r.params.constraint}
    if not wires:
        return
    loop = asyncio.get_running_loop()
    for wire in sorted(wires):
        await loop.run_in_executor(_executor, _compile, wire, model, fields)


def _compile(wire: str, model: ModelInfo, fields: Mapping[str, str]) -> None:
    spec = ConstraintSpec.from_wire(wire)
    try:
        _compiler(model).compile(spec)
    except InvalidRequestError as error:
        field = fields.get(spec.kind, "constraint")
        raise InvalidRequestError(f"{field}: {error}", field) from error


def _compiler(model: ModelInfo) -> GrammarCompiler:
    key = id(model.tokenizer)
    if key not in _compilers:
        tokenizer = model.tokenizer
        _compilers[key] = GrammarCompiler(tokenizer, len(tokenizer), sorted(model.eos_token_ids))
    return _compilers[key]


def output_constraint(body: dict) -> ConstraintSpec | None:
    """An OpenAI body's constraint besides tools: `response_format`, or vLLM's `guided_json`,
    `guided_regex`, `guided_choice` extras (as `extra_body`), not both."""
    response_format = response_format_constraint(body)
    guided = kserve_constraint(body)
    if response_format is not None and guided is not None:
        raise InvalidRequestError(f"use response_format or {guided.param}, not both", guided.param)
    return response_format or guided


def openai_fields(body: dict) -> Mapping[str, str]:
    """Which field of this OpenAI body a compile error names (see `check_constraints`)."""
    return KSERVE_FIELDS if kserve_constraint(body) is not None else OPENAI_FIELDS
