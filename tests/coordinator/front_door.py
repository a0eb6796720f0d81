"""Raw requests to a cluster's three front doors, for tests that send what clients should not:
JSON with NaN literals and lone surrogates, any header, gRPC messages built field by field."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

LONE_SURROGATE = "\ud83d"


def post(
    url: str, body: object, headers: dict[str, str] | None = None
) -> tuple[int, dict, dict[str, str]]:
    """POST `body` as Python's JSON encoder writes it (NaN, Infinity, "\\ud83d" escapes)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data, {"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, _json_or_text(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, _json_or_text(error.read()), dict(error.headers)


def get(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, None, headers or {}), timeout=30):
            return 200
    except urllib.error.HTTPError as error:
        return error.code


def _json_or_text(raw: bytes) -> dict:
    try:
        return json.loads(raw)
    except ValueError:
        return {"text": raw.decode(errors="replace")}


def grpc_stub(port: int) -> tuple[grpc.Channel, service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer_request(
    model: str, prompt: bytes = b"Hi", **parameters: tuple[str, object]
) -> service_pb2.ModelInferRequest:
    """One `text_input` prompt; each parameter given as (which InferParameter field, value)."""
    request = service_pb2.ModelInferRequest(model_name=model, id="r1")
    tensor = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(prompt)
    for name, (kind, value) in {"max_tokens": ("int64_param", 2), **parameters}.items():
        setattr(request.parameters[name], kind, value)
    return request
