from __future__ import annotations

import json

import pytest

from coordinator.constraints import kserve_constraint, response_format_constraint
from disagg.errors import InvalidRequestError

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("body", [{}, {"response_format": {"type": "text"}}])
def test_text_is_unconstrained(body):
    assert response_format_constraint(body) is None


def test_json_object_and_json_schema():
    assert (
        response_format_constraint({"response_format": {"type": "json_object"}}).kind
        == "json_object"
    )
    body = {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
        }
    }
    spec = response_format_constraint(body)
    assert (spec.kind, spec.schema, spec.param) == ("json_schema", SCHEMA, "response_format")


@pytest.mark.parametrize(
    "fmt",
    [
        "json",
        {"type": "yaml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x"}},
    ],
)
def test_bad_response_formats_name_the_field(fmt):
    with pytest.raises(InvalidRequestError) as info:
        response_format_constraint({"response_format": fmt})
    assert info.value.param == "response_format"


@pytest.mark.parametrize("schema", [SCHEMA, json.dumps(SCHEMA)])
def test_guided_json_as_object_or_string(schema):
    spec = kserve_constraint({"guided_json": schema, "max_tokens": 5})
    assert (spec.kind, spec.schema, spec.param) == ("json_schema", SCHEMA, "guided_json")


@pytest.mark.parametrize("choices", [["yes", "no"], '["yes", "no"]'])
def test_guided_choice_as_list_or_string(choices):
    assert kserve_constraint({"guided_choice": choices}).choices == ("yes", "no")


def test_guided_regex_and_none():
    assert kserve_constraint({"guided_regex": r"\d+"}).regex == r"\d+"
    assert kserve_constraint({"temperature": 0}) is None


@pytest.mark.parametrize(
    ("parameters", "param"),
    [
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": "[1]"}, "guided_json"),
        ({"guided_regex": 5}, "guided_regex"),
        ({"guided_choice": "yes"}, "guided_choice"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_bad_guided_parameters_name_the_field(parameters, param):
    with pytest.raises(InvalidRequestError) as info:
        kserve_constraint(parameters)
    assert info.value.param == param
