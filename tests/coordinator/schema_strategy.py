"""Hypothesis strategies from the JSON Schema subset `coordinator.openapi` uses: type, const,
enum, oneOf, numeric bounds, string and array lengths, properties, required and
additionalProperties. Optional properties are each present or not; values stay small."""

from __future__ import annotations

from hypothesis import strategies as st

MAX_ITEMS = 3


def from_schema(schema: dict) -> st.SearchStrategy:
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of([from_schema(s) for s in schema["oneOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}) for k in kind])
    return _BY_TYPE[kind](schema)


def _integer(schema: dict) -> st.SearchStrategy:
    return st.integers(schema.get("minimum"), schema.get("maximum"))


def _number(schema: dict) -> st.SearchStrategy:
    low, high = schema.get("minimum"), schema.get("maximum")
    is_open = "exclusiveMinimum" in schema
    return st.floats(low, high, exclude_min=is_open, allow_nan=False, allow_infinity=False)


def _string(schema: dict) -> st.SearchStrategy:
    return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 12))


def _array(schema: dict) -> st.SearchStrategy:
    low = schema.get("minItems", 0)
    high = min(schema.get("maxItems", MAX_ITEMS), max(low, MAX_ITEMS))
    return st.lists(
        from_schema(schema.get("items", {"type": "string"})), min_size=low, max_size=high
    )


def _object(schema: dict) -> st.SearchStrategy:
    properties = schema.get("properties", {})
    required = set(schema.get("required", ()))
    if not properties and "additionalProperties" in schema:
        keys = st.integers(0, 50_000).map(str)
        return st.dictionaries(keys, from_schema(schema["additionalProperties"]), max_size=2)
    fields = {
        name: from_schema(sub) if name in required else st.none() | from_schema(sub)
        for name, sub in properties.items()
    }
    return st.fixed_dictionaries(fields).map(
        lambda body: {k: v for k, v in body.items() if v is not None or k in required}
    )


_BY_TYPE = {
    "integer": _integer,
    "number": _number,
    "string": _string,
    "boolean": lambda schema: st.booleans(),
    "null": lambda schema: st.none(),
    "array": _array,
    "object": _object,
}
