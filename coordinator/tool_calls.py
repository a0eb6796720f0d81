"""OpenAI tool calling in and out: `tools`/`tool_choice` to a prompt and a constraint, and
generated text back to `message.tool_calls` or streamed `delta.tool_calls`.

The model writes calls in the format of `disagg.grammar.spec` (Hermes / Qwen2.5 style)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and the grammar guarantees that format whenever tools are offered. Where the chat template
renders `tools` itself (it mentions `tools`), the tools go to the template; otherwise a
generic system prompt (`GENERIC_TOOL_PROMPT`) describes them, assistant calls are rendered
back in the same format and tool results become user turns wrapped in `<tool_response>`.

`tool_choice`: `none` offers no tools and no constraint; `auto` allows text or calls;
`required` demands at least one call; a named function demands calls to that one only.
`parallel_tool_calls: false` allows at most one call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from disagg.errors import InvalidRequestError
from disagg.grammar.spec import TOOL_CALL_BEGIN, TOOL_CALL_END, ConstraintSpec, ToolSpec

GENERIC_TOOL_PROMPT = """You can call functions. Each one, with the JSON Schema of its arguments:
{tools}

To call a function, write one block per call, exactly like this:
{begin}
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
{end}"""


@dataclass(frozen=True)
class ToolPlan:
    """What `tools` + `tool_choice` + `parallel_tool_calls` mean for one chat request."""

    tools: list[dict]
    """The OpenAI tool definitions offered to the model (empty: none)."""
    constraint: ConstraintSpec | None
    """What the output must follow; None when no tools are offered."""
    instruction: str
    """The generic prompt's extra line for the choice ("" for auto)."""


def plan_tools(body: dict) -> ToolPlan:
    """Read tools, tool_choice and parallel_tool_calls; a bad value is a 400 naming its field."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list", "tools")
    specs = [_tool_spec(i, tool) for i, tool in enumerate(tools)]
    choice = body.get("tool_choice") or ("auto" if specs else "none")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise InvalidRequestError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    if choice == "none" or not specs:
        if choice not in ("none", "auto"):
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        return ToolPlan([], None, "")
    chosen, required, instruction = _apply_choice(choice, specs)
    constraint = ConstraintSpec(
        "tool_calls",
        tools=tuple(chosen),
        is_tool_call_required=required,
        is_parallel=parallel,
        param="tools",
    )
    if not parallel:
        instruction = f"{instruction} Call at most one function.".strip()
    return ToolPlan(tools, constraint, instruction)


def _tool_spec(index: int, tool: object) -> ToolSpec:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidRequestError(f"tools[{index}] must be a function tool", "tools")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequestError(f"tools[{index}].function needs a name", "tools")
    if not function["name"]:
        raise InvalidRequestError(f"tools[{index}].function needs a name", "tools")
    parameters = function.get("parameters")
    parameters = {"type": "object"} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise InvalidRequestError(f"tools[{index}].function.parameters must be an object", "tools")
    return ToolSpec(function["name"], parameters)


def _apply_choice(choice: object, specs: list[ToolSpec]) -> tuple[list[ToolSpec], bool, str]:
    """(the tools calls may use, whether a call is required, the generic prompt's line)."""
    if choice == "auto":
        return specs, False, ""
    if choice == "required":
        return specs, True, "You must call at least one function."
    name = _named_choice(choice)
    chosen = [s for s in specs if s.name == name]
    if not chosen:
        raise InvalidRequestError(
            f"tool_choice names {name!r}, which is not in tools", "tool_choice"
        )
    return chosen, True, f"You must call the function {name}."


def _named_choice(choice: object) -> str:
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequestError(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    return function["name"]


def has_native_tools(tokenizer: object) -> bool:
    """Whether the chat template renders a `tools` argument itself."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def prompt_messages(messages: list[dict], plan: ToolPlan, is_native: bool) -> list[dict]:
    """The messages to render: tool turns in the model's format; the generic prompt if needed.

    With a native template, pass `plan.tools` as the template's `tools` argument as well.
    """
    if is_native:
        return [_native_message(m) for m in messages]
    rendered = [_generic_message(i, m) for i, m in enumerate(messages)]
    if not plan.tools:
        return rendered
    system = generic_tool_prompt(plan)
    if rendered and rendered[0].get("role") == "system":
        first = rendered[0]
        return [{**first, "content": f"{first['content']}\n\n{system}"}, *rendered[1:]]
    return [{"role": "system", "content": system}, *rendered]


def generic_tool_prompt(plan: ToolPlan) -> str:
    """The system prompt text that describes `plan.tools` to a model without a tool template."""
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in plan.tools)
    text = GENERIC_TOOL_PROMPT.format(tools=listed, begin=TOOL_CALL_BEGIN, end=TOOL_CALL_END)
    return f"{text}\n{plan.instruction}" if plan.instruction else text


def _native_message(message: dict) -> dict:
    """HF tool templates take each call's arguments as an object, not OpenAI's JSON string."""
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not calls:
        return message
    parsed = [_call_with_object_arguments(c) for c in calls]
    return {**message, "content": message.get("content") or "", "tool_calls": parsed}


def _generic_message(index: int, message: dict) -> dict:
    if not isinstance(message, dict):
        return message
    if message.get("role") == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise InvalidRequestError(f"messages[{index}] (tool) needs a tool_call_id", "messages")
        body = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
        return {"role": "user", "content": body}
    if message.get("role") == "assistant" and message.get("tool_calls"):
        blocks = [format_tool_call(_call_with_object_arguments(c)) for c in message["tool_calls"]]
        text = "\n".join([message["content"], *blocks] if message.get("content") else blocks)
        return {"role": "assistant", "content": text}
    return message


def _call_with_object_arguments(call: object) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequestError("an assistant tool_call needs function.name", "messages")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError as exc:
        raise InvalidRequestError("tool_call arguments must be a JSON string", "messages") from exc
    return {**call, "function": {"name": function["name"], "arguments": parsed}}


def format_tool_call(call: dict) -> str:
    """One call (arguments as an object) in the model's format, as the grammar enforces it."""
    function = call["function"]
    name, arguments = json.dumps(function["name"]), json.dumps(function["arguments"])
    return f'{TOOL_CALL_BEGIN}\n{{"name": {name}, "arguments": {arguments}}}\n{TOOL_CALL_END}'


def new_tool_call_id() -> str:
    """OpenAI-style: `call_` and 24 hex characters."""
    return f"call_{uuid.uuid4().hex[:24]}"
