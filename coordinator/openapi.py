"""The HTTP API as an OpenAPI 3.1 document, served at `GET /openapi.json`.

The request schemas state the ranges the front door enforces (`openai_fields`,
`request_values`, `kserve_text`), so a client generator or a fuzzer reads the same contract
the server checks; the fuzz tests draw bodies from them. Responses are described by shape only.
"""

from __future__ import annotations

from coordinator.frontend import SERVER_VERSION
from coordinator.openai_fields import MAX_STOP_SEQUENCES
from coordinator.openai_protocol import MAX_N, PRIORITY_LIMIT
from coordinator.request_values import INT64_MIN, UINT32_LIMIT, UINT64_LIMIT
from disagg.engine.sampling_params import (
    LOGIT_BIAS_RANGE,
    PENALTY_RANGE,
    REPETITION_PENALTY_RANGE,
)

OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"], "description": "the offending field"},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
KSERVE_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
STOP = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "maxItems": MAX_STOP_SEQUENCES,
            "items": {"type": "string", "minLength": 1},
        },
        {"type": "null"},
    ]
}


def _range(low: float, high: float, **extra: object) -> dict:
    return {"type": "number", "minimum": low, "maximum": high, **extra}


def _int(low: int, high: int, **extra: object) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high, **extra}


SAMPLING = {
    "temperature": _range(0, 2),
    "top_p": _range(0, 1, exclusiveMinimum=0),
    "top_k": _int(-1, UINT32_LIMIT - 1, description="-1 or 0: off (vLLM)"),
    "seed": _int(INT64_MIN, UINT64_LIMIT - 1, description="-1: random"),
    "stop": STOP,
    "min_tokens": _int(0, UINT32_LIMIT - 1),
    "ignore_eos": {"type": "boolean"},
    "n": _int(1, MAX_N),
    "presence_penalty": _range(*PENALTY_RANGE, description="over the output tokens"),
    "frequency_penalty": _range(*PENALTY_RANGE, description="over the output tokens"),
    "repetition_penalty": _range(
        *REPETITION_PENALTY_RANGE, description="over prompt and output tokens; 1 is off"
    ),
    "logit_bias": {
        "type": "object",
        "propertyNames": {"pattern": "^[0-9]{1,10}$"},
        "additionalProperties": _range(*LOGIT_BIAS_RANGE),
        "description": "token id -> bias added to its logit",
    },
    "user": {"type": "string"},
    "priority": _int(
        -PRIORITY_LIMIT, PRIORITY_LIMIT, description="lower is sooner, among the tenant's own"
    ),
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
    },
    "max_tokens": _int(1, UINT32_LIMIT - 1, description="0 is a 400, as in vLLM"),
}
MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool"]},
        "content": {
            "oneOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                    },
                },
            ]
        },
    },
}
TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
COMPLETION_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "model": {"type": "string"},
        "prompt": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                TOKEN_IDS,
                {"type": "array", "minItems": 1, "items": TOKEN_IDS},
            ]
        },
        "logprobs": _int(0, 5),
        "echo": {"const": False},
        "best_of": {"const": 1},
        **SAMPLING,
    },
}
CHAT_REQUEST = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        "max_completion_tokens": _int(1, UINT32_LIMIT - 1),
        "logprobs": {"type": "boolean"},
        "top_logprobs": _int(0, 20, description="needs logprobs: true"),
        **SAMPLING,
    },
}
KSERVE_PARAMETERS = {
    "type": "object",
    "properties": {
        name: SAMPLING[name]
        for name in (
            *("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_tokens"),
            *("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"),
        )
    }
    | {"ignore_eos": {"type": "boolean"}, "tenant_id": {"type": "string", "maxLength": 128}},
}
GENERATE_REQUEST = {
    "type": "object",
    "required": ["text_input"],
    "properties": {
        "id": {"type": "string"},
        "text_input": {"type": "string", "minLength": 1},
        "parameters": KSERVE_PARAMETERS,
    },
}
INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "inputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "datatype", "shape", "data"],
                "properties": {
                    "name": {"enum": ["text_input", "prompt"]},
                    "datatype": {"const": "BYTES"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "data": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "outputs": {"type": "array", "items": {"type": "object"}},
        "parameters": KSERVE_PARAMETERS,
    },
}
SCHEMAS = {
    "CompletionRequest": COMPLETION_REQUEST,
    "ChatCompletionRequest": CHAT_REQUEST,
    "GenerateRequest": GENERATE_REQUEST,
    "InferRequest": INFER_REQUEST,
    "OpenAIError": OPENAI_ERROR,
    "KServeError": KSERVE_ERROR,
}


def _post(summary: str, schema: str, error: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
                },
            },
            "responses": {
                "200": {"description": "the result (JSON, or server-sent events when streamed)"},
                **{
                    code: {
                        "description": meaning,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": f"#/components/schemas/{error}"}
                            }
                        },
                    }
                    for code, meaning in ERRORS.items()
                },
            },
        }
    }


ERRORS = {
    "400": "a field out of range or of the wrong type; OpenAI's `param` names it",
    "401": "a missing or unknown API key (when keys are configured)",
    "404": "an unknown model or version",
    "413": "a body over the size limit",
    "429": "over the tenant's quota: retry after Retry-After",
    "503": "overloaded or no worker: retry after Retry-After",
}


def _get(summary: str) -> dict:
    return {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}


def openapi_document() -> dict:
    model = "/v2/models/{model}"
    return {
        "openapi": "3.1.0",
        "info": {"title": "disagg", "version": SERVER_VERSION},
        "paths": {
            "/v1/models": _get("the served model (OpenAI)"),
            "/v1/completions": _post("text completion", "CompletionRequest", "OpenAIError"),
            "/v1/chat/completions": _post(
                "chat completion", "ChatCompletionRequest", "OpenAIError"
            ),
            "/v2": _get("KServe V2 server metadata"),
            "/v2/health/live": _get("liveness (always open)"),
            "/v2/health/ready": _get("readiness (always open)"),
            model: _get("KServe V2 model metadata"),
            model + "/ready": _get("model readiness"),
            model + "/infer": _post("KServe V2 inference", "InferRequest", "KServeError"),
            model + "/generate": _post("generate extension", "GenerateRequest", "KServeError"),
            model + "/generate_stream": _post(
                "generate extension, as server-sent events", "GenerateRequest", "KServeError"
            ),
            "/health": _get("health (always open)"),
            "/metrics": _get("Prometheus metrics (open unless --metrics-key is set)"),
            "/cluster": _get("workers and their KV blocks"),
            "/openapi.json": _get("this document"),
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }
