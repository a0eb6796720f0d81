from __future__ import annotations

import pytest

from disagg.errors import InvalidRequestError
from disagg.grammar.spec import ConstraintSpec, ToolSpec, tool_call_prefix

WEATHER = ToolSpec("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}})

SPECS = [
    ConstraintSpec("json_object"),
    ConstraintSpec(
        "json_schema", schema={"type": "object", "properties": {"a": {"type": "integer"}}}
    ),
    ConstraintSpec("regex", regex=r"\d{3}-[a-z]+"),
    ConstraintSpec("choice", choices=("yes", "no", 'say "hi"')),
    ConstraintSpec("tool_calls", tools=(WEATHER,), is_tool_call_required=True, is_parallel=False),
    ConstraintSpec("tool_calls", tools=(WEATHER, ToolSpec("noop"))),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_wire_round_trip_is_equal_and_a_string(spec):
    wire = spec.to_wire()
    assert isinstance(wire, str)
    rebuilt = ConstraintSpec.from_wire(wire)
    assert rebuilt.to_wire() == wire
    assert (rebuilt.kind, rebuilt.schema, rebuilt.regex, rebuilt.choices, rebuilt.tools) == (
        spec.kind,
        spec.schema,
        spec.regex,
        spec.choices,
        spec.tools,
    )
    assert (rebuilt.is_tool_call_required, rebuilt.is_parallel) == (
        spec.is_tool_call_required,
        spec.is_parallel,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "grammar"}, "unsupported constraint"),
        ({"kind": "json_schema", "schema": "not an object"}, "must be an object"),
        ({"kind": "regex", "regex": ""}, "non-empty"),
        ({"kind": "choice", "choices": ()}, "non-empty"),
        ({"kind": "choice", "choices": ("a", "")}, "non-empty"),
        ({"kind": "tool_calls", "tools": ()}, "at least one tool"),
        ({"kind": "tool_calls", "tools": (ToolSpec(""),)}, "needs a name"),
        ({"kind": "tool_calls", "tools": (ToolSpec("f", []),)}, "parameters must be an object"),
    ],
)
def test_bad_specs_name_the_request_field(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        ConstraintSpec(**kwargs, param="guided_json")
    assert info.value.param == "guided_json"


@pytest.mark.parametrize("wire", ["", "{", '{"regex": "a"}', '{"kind": "regex"}', "[1]"])
def test_malformed_wire_strings_are_rejected(wire):
    with pytest.raises(InvalidRequestError) as info:
        ConstraintSpec.from_wire(wire)
    assert info.value.param == "constraint"


def test_tool_call_prefix_escapes_the_name():
    assert tool_call_prefix('we"ird') == '<tool_call>\n{"name": "we\\"ird", "arguments": '


def test_wire_keeps_the_order_of_schema_properties():
    schema = {"type": "object", "properties": {"z": {}, "a": {}, "m": {}}}
    rebuilt = ConstraintSpec.from_wire(ConstraintSpec("json_schema", schema=schema).to_wire())
    assert list(rebuilt.schema["properties"]) == ["z", "a", "m"]
