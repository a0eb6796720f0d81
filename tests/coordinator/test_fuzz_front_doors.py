"""Property-based fuzzing of the three front doors on the in-process cluster.

HTTP bodies are drawn from the schemas `GET /openapi.json` publishes (`schema_strategy`),
then up to two fields are overwritten with hostile JSON (NaN, Infinity, integers past 2^64,
lone surrogates, wrong types); gRPC requests get parameters of every InferParameter kind and
arbitrary prompt bytes. The property: never a 5xx (gRPC: only INVALID_ARGUMENT or NOT_FOUND),
every error in its protocol's shape, and afterwards the server serves and every KV block is
free. Derandomized with bounded examples, so the run is the same every time and takes seconds.
"""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.openapi import openapi_document
from tests.coordinator.front_door import LONE_SURROGATE, get, grpc_stub, infer_request, post
from tests.coordinator.schema_strategy import from_schema

DOCUMENT = openapi_document()
SCHEMAS = DOCUMENT["components"]["schemas"]
FUZZ = settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MAX_NEW_TOKENS = 4
"""Valid token budgets are cut to this, so a drawn body never runs long."""

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([-1, 0, 2**32, 2**63, 2**64, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from([LONE_SURROGATE, "a\udc00", ""]),
)
HOSTILE = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
EXTRA_NAMES = ("unknown", "response_format", "tools", "tool_choice", "id", "parameters")
"""Fields outside the schema that parsers still look at (a non-object response_format was a
500 until the fuzz found it; see test_input_validation)."""
ENDPOINTS = {
    "completions": ("/v1/completions", "CompletionRequest", "max_tokens"),
    "chat": ("/v1/chat/completions", "ChatCompletionRequest", "max_completion_tokens"),
    "generate": ("/v2/models/{model}/generate", "GenerateRequest", None),
    "generate_stream": ("/v2/models/{model}/generate_stream", "GenerateRequest", None),
    "infer": ("/v2/models/{model}/infer", "InferRequest", None),
}


@pytest.fixture(scope="module")
def serve(inprocess_cluster):
    return inprocess_cluster


def bodies(schema_name: str) -> st.SearchStrategy[dict]:
    schema = SCHEMAS[schema_name]
    names = sorted(schema["properties"]) + list(EXTRA_NAMES)
    hostile = st.dictionaries(st.sampled_from(names), HOSTILE, max_size=2)
    return st.tuples(from_schema(schema), hostile).map(lambda pair: {**pair[0], **pair[1]})


def bounded(body: dict, budget_field: str | None) -> dict:
    """Keep generation short: valid budgets cut to MAX_NEW_TOKENS, an unset one set to it."""
    holder = body if budget_field else body.setdefault("parameters", {})
    if not isinstance(holder, dict):
        return body
    name = budget_field or "max_tokens"
    value = holder.get(name)
    if value is None or (type(value) is int and value > MAX_NEW_TOKENS):
        holder[name] = MAX_NEW_TOKENS
    if budget_field == "max_completion_tokens" and type(body.get("max_tokens")) is int:
        body["max_tokens"] = min(body["max_tokens"], MAX_NEW_TOKENS)
    return body


def assert_protocol_shape(path: str, status: int, reply: dict) -> None:
    assert status < 500, (status, reply)
    if status >= 400:
        schema = "OpenAIError" if path.startswith("/v1") else "KServeError"
        jsonschema.validate(reply, SCHEMAS[schema])


def assert_serves_and_frees(serve) -> None:
    status, reply, _ = post(f"{serve.url}/v1/completions", {"prompt": "Hi", "max_tokens": 1})
    assert status == 200 and reply["usage"]["completion_tokens"] == 1, reply
    serve.wait_all_blocks_free()


def test_openapi_document_is_served(serve):
    with __import__("urllib.request").request.urlopen(f"{serve.url}/openapi.json") as response:
        document = json.load(response)
    assert document["openapi"].startswith("3.1") and "/v1/chat/completions" in document["paths"]
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert get(f"{serve.url}/openapi.json") == 200


@pytest.mark.slow  # several seconds: the full suite runs it
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_http_fuzz_no_5xx_errors_in_shape_blocks_free(serve, endpoint):
    path, schema_name, budget_field = ENDPOINTS[endpoint]
    url = serve.url + path.format(model=serve.model)

    @FUZZ
    @given(body=bodies(schema_name))
    def one(body: dict) -> None:
        body = bounded(body, budget_field)
        if "model" in body and not isinstance(body["model"], str):
            pass  # a hostile model name is a 404 or 400; still checked below
        elif path.startswith("/v1"):
            body["model"] = serve.model
        status, reply, _ = post(url, body)
        assert_protocol_shape(path, status, reply)

    one()
    assert_serves_and_frees(serve)


GRPC_VALUES = st.one_of(
    st.tuples(st.just("int64_param"), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    st.tuples(st.just("uint64_param"), st.integers(min_value=0, max_value=2**64 - 1)),
    st.tuples(st.just("double_param"), st.floats(allow_nan=True, allow_infinity=True)),
    st.tuples(st.just("string_param"), st.text(max_size=12)),
    st.tuples(st.just("bool_param"), st.booleans()),
)
GRPC_NAMES = ["temperature", "top_p", "top_k", "seed", "stop", "min_tokens", "ignore_eos"]


def test_grpc_fuzz_only_invalid_argument(serve):
    channel, stub = grpc_stub(serve.grpc_port)

    @FUZZ
    @given(
        parameters=st.dictionaries(st.sampled_from(GRPC_NAMES), GRPC_VALUES, max_size=3),
        prompt=st.binary(max_size=12) | st.text(max_size=12).map(str.encode),
    )
    def one(parameters: dict, prompt: bytes) -> None:
        request = infer_request(serve.model, prompt, **parameters)
        try:
            stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.details(), parameters)
            assert error.details()

    with channel:
        one()
    assert_serves_and_frees(serve)
