"""`--json-schema-fraction`: which requests carry `response_format`, and that the default schema
keeps constrained requests running to max_tokens (so both kinds count the same tokens)."""

from __future__ import annotations

import json

import pytest

from bench.serving.client import RequestOptions, request_body
from bench.serving.structured import BENCH_SCHEMA, is_constrained, load_schema
from bench.serving.workload import WorkloadRequest


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (0.5, 8), (0.25, 4), (1.0, 16)])
def test_the_fraction_is_spread_evenly_over_the_requests(fraction, expected):
    flags = [is_constrained(i, fraction) for i in range(16)]
    assert sum(flags) == expected
    assert sum(flags[:8]) == expected // 2, "any prefix holds its share"


def test_constrained_bodies_carry_the_schema_and_the_others_do_not():
    options = RequestOptions("m", json_schema_fraction=0.5)
    bodies = [json.loads(request_body(WorkloadRequest(i, "a b", 2, 64), options)) for i in (0, 1)]
    assert "response_format" not in bodies[0]
    assert bodies[1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "bench", "schema": BENCH_SCHEMA},
    }
    with pytest.raises(ValueError, match="json_schema_fraction"):
        RequestOptions(json_schema_fraction=1.5)


def test_the_default_schema_cannot_finish_within_64_tokens():
    """The shortest document it accepts, tokenized by the default model's tokenizer."""
    from disagg.model.loader import load_model_info

    item = {"name": "", "qty": 0, "unit": "g"}
    shortest = json.dumps({"items": [item] * 16}, separators=(",", ":"))
    tokenizer = load_model_info("default").tokenizer
    assert len(tokenizer.encode(shortest, add_special_tokens=False)) > 64


def test_a_schema_file_must_hold_an_object(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"type": "object"}')
    assert load_schema(path) == {"type": "object"}
    assert load_schema(None) is BENCH_SCHEMA
    path.write_text("[1]")
    with pytest.raises(ValueError, match="must be an object"):
        load_schema(path)
