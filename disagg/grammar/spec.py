"""What a request constrains its output to, as a value that travels on the wire as a string.

A `ConstraintSpec` is engine-neutral: the coordinator builds it from OpenAI `response_format`,
`tools`/`tool_choice` or KServe `guided_*` parameters, sends `to_wire()` to the workers, and each
worker compiles it with its own `GrammarCompiler`. Shape errors are caught here, where the field
can still be named in a 400; grammar errors (a regex that does not compile) when compiling.

Tool calls use one text format (the one Hermes-style and Qwen2.5 templates use), so the prompt
the coordinator writes, the grammar the worker enforces and the parser that reads the output
agree on it::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from disagg.errors import InvalidRequestError

KINDS = ("json_object", "json_schema", "regex", "choice", "tool_calls")
TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


def tool_call_prefix(name: str) -> str:
    """The text every call of tool `name` starts with; the arguments object follows it."""
    return f'{TOOL_CALL_BEGIN}\n{{"name": {json.dumps(name)}, "arguments": '


TOOL_CALL_SUFFIX = f"}}\n{TOOL_CALL_END}"


@dataclass(frozen=True)
class ToolSpec:
    """One callable function: its name and the JSON Schema of its arguments object."""

    name: str
    parameters: dict = field(default_factory=lambda: {"type": "object"})


@dataclass(frozen=True)
class ConstraintSpec:
    """One request's output constraint; `kind` says which of the other fields is set."""

    kind: str
    """One of KINDS."""
    schema: dict | None = None
    """json_schema: the JSON Schema the output must validate against."""
    regex: str | None = None
    """regex: the output must match it in full."""
    choices: tuple[str, ...] = ()
    """choice: the output is exactly one of these strings."""
    tools: tuple[ToolSpec, ...] = ()
    """tool_calls: the functions the output may call."""
    is_tool_call_required: bool = False
    """tool_calls: the output is calls only, at least one (tool_choice required or named)."""
    is_parallel: bool = True
    """tool_calls: more than one call may follow another (OpenAI parallel_tool_calls)."""
    param: str = "response_format"
    """The request field this came from, named in errors; not sent on the wire."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"unsupported constraint {self.kind!r}", self.param)
        check = {
            "json_schema": self._check_schema,
            "regex": self._check_regex,
            "choice": self._check_choices,
            "tool_calls": self._check_tools,
        }.get(self.kind)
        if check:
            check()

    def _check_schema(self) -> None:
        if not isinstance(self.schema, dict):
            raise InvalidRequestError("a JSON schema must be an object", self.param)

    def _check_regex(self) -> None:
        if not isinstance(self.regex, str) or not self.regex:
            raise InvalidRequestError("a regex must be a non-empty string", self.param)

    def _check_choices(self) -> None:
        if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
            raise InvalidRequestError("choices must be non-empty strings", self.param)

    def _check_tools(self) -> None:
        if not self.tools:
            raise InvalidRequestError("tool calls need at least one tool", self.param)
        for tool in self.tools:
            if not isinstance(tool.name, str) or not tool.name:
                raise InvalidRequestError("every tool needs a name", self.param)
            if not isinstance(tool.parameters, dict):
                message = f"tool {tool.name!r}: parameters must be an object"
                raise InvalidRequestError(message, self.param)

    def to_wire(self) -> str:
        """A compact JSON string; `from_wire` rebuilds an equal spec."""
        body: dict[str, Any] = {"kind": self.kind}
        if self.schema is not None:
            body["schema"] = self.schema
        if self.regex is not None:
            body["regex"] = self.regex
        if self.choices:
            body["choices"] = list(self.choices)
        if self.tools:
            body["tools"] = [{"name": t.name, "parameters": t.parameters} for t in self.tools]
            body["required"] = self.is_tool_call_required
            body["parallel"] = self.is_parallel
        # NOTE: keys keep their order: a schema's properties are generated in that order.
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_wire(cls, text: str) -> ConstraintSpec:
        """Parse `to_wire()` output; a malformed string raises InvalidRequestError."""
        try:
            body = json.loads(text)
            tools = tuple(ToolSpec(t["name"], t["parameters"]) for t in body.get("tools", ()))
            return cls(
                kind=body["kind"],
                schema=body.get("schema"),
                regex=body.get("regex"),
                choices=tuple(body.get("choices", ())),
                tools=tools,
                is_tool_call_required=bool(body.get("required", False)),
                is_parallel=bool(body.get("parallel", True)),
                param="constraint",
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidRequestError(f"malformed constraint: {exc}", "constraint") from exc
