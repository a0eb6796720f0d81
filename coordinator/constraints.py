"""Request fields to a `ConstraintSpec`: OpenAI `response_format` and KServe `guided_*`.

OpenAI: `{"type": "text"}` (no constraint), `{"type": "json_object"}`, and
`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`; the SDK's
`beta.chat.completions.parse(response_format=Model)` sends the latter.
KServe `parameters` use vLLM's names: `guided_json` (a schema, as an object or a JSON string),
`guided_regex`, `guided_choice` (a list of strings, or a JSON string of one); at most one.

Shapes are checked here; whether xgrammar supports a schema or compiles a regex is found
when the coordinator compiles the spec once (`GrammarCompiler.compile`), still before any
KV is allocated, so every bad constraint is a 400 naming its field.
"""

from __future__ import annotations

import json

from disagg.errors import InvalidRequestError
from disagg.grammar.spec import ConstraintSpec

GUIDED_PARAMETERS = ("guided_json", "guided_regex", "guided_choice")


def response_format_constraint(body: dict) -> ConstraintSpec | None:
    """The constraint `response_format` asks for, or None for text (or no field)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequestError("response_format must be an object", "response_format")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object")
    if kind != "json_schema":
        raise InvalidRequestError(
            f"response_format type {kind!r} is not one of text, json_object, json_schema",
            "response_format",
        )
    json_schema = fmt.get("json_schema")
    if not isinstance(json_schema, dict) or not isinstance(json_schema.get("schema"), dict):
        raise InvalidRequestError(
            "response_format.json_schema needs a schema object", "response_format"
        )
    return ConstraintSpec("json_schema", schema=json_schema["schema"])


def kserve_constraint(parameters: dict) -> ConstraintSpec | None:
    """The constraint in KServe `parameters` (guided_json/regex/choice), or None."""
    given = [name for name in GUIDED_PARAMETERS if parameters.get(name) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError(f"use one of {', '.join(given)}, not several", given[1])
    name = given[0]
    value = parameters[name]
    if name == "guided_json":
        schema = _json_value(name, value)
        return ConstraintSpec("json_schema", schema=schema, param=name)
    if name == "guided_regex":
        return ConstraintSpec("regex", regex=value if isinstance(value, str) else None, param=name)
    choices = _json_value(name, value) if isinstance(value, str) else value
    if not isinstance(choices, list):
        raise InvalidRequestError("guided_choice must be a list of strings", name)
    return ConstraintSpec("choice", choices=tuple(choices), param=name)


def _json_value(name: str, value: object) -> object:
    """KServe parameters are often strings: parse JSON text, pass objects through."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise InvalidRequestError(f"{name} is not valid JSON: {exc}", name) from exc
