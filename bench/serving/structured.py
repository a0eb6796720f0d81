"""Structured-output load: which requests of a run ask for JSON under a schema, and how.

`--json-schema-fraction F` constrains that share of the workload, spread evenly by request
index (request i is constrained when floor((i + 1) F) > floor(i F), so 0.5 constrains every
second one and any prefix of n requests holds round-down n F of them). Each constrained body
carries OpenAI `response_format` `json_schema`, which disagg, vLLM and llama.cpp all accept on
/v1/completions and /v1/chat/completions.

The default schema cannot be completed in fewer than 16 array items (well over 64 tokens),
so under `ignore_eos` a constrained request runs to `max_tokens` like a free one and both
kinds produce the same token counts; its strings are free, so the grammar's mask is the
cheap kind (no `maxLength`; see disagg/grammar/mask.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

BENCH_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 16,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "qty": {"type": "integer", "minimum": 0},
                    "unit": {"enum": ["kg", "g", "l", "ml", "pcs"]},
                },
                "required": ["name", "qty", "unit"],
            },
        }
    },
    "required": ["items"],
}


def is_constrained(index: int, fraction: float) -> bool:
    """Request `index` of a run whose `fraction` of requests is constrained."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def response_format(schema: dict) -> dict:
    """The OpenAI `response_format` asking for output that validates against `schema`."""
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}


def load_schema(path: Path | None) -> dict:
    """The JSON Schema in `path`, or the default one; ValueError if it is not an object."""
    if path is None:
        return BENCH_SCHEMA
    schema = json.loads(path.read_text())
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a JSON Schema must be an object")
    return schema
