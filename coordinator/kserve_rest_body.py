"""KServe V2 REST bodies: JSON or binary tensor data in, and the infer response out.

Binary tensor data (Triton's extension, what tritonclient sends by default): the first
`Inference-Header-Content-Length` bytes are the JSON header, the rest the tensors' raw
bytes in the order of the inputs, each `parameters.binary_data_size` long. Bodies may be
gzip or deflate encoded; the size limit holds after inflating.
"""

from __future__ import annotations

import json
import zlib

from starlette.requests import Request
from starlette.responses import Response

from coordinator.errors import MAX_BODY_BYTES, TooLargeError
from coordinator.http_io import parse_json_object, read_body
from coordinator.kserve_tensor import (
    Tensor,
    check_datatype,
    check_shape_value,
    flatten,
    tensor_from_bytes,
    tensor_to_bytes,
)
from coordinator.kserve_text import OUTPUT_DATATYPES, check_output_names
from disagg.errors import InvalidRequestError

HEADER_LENGTH = "Inference-Header-Content-Length"


async def read_kserve_body(request: Request) -> bytes:
    """The body, inflated as its Content-Encoding says; 413 past MAX_BODY_BYTES either way."""
    raw = await read_body(request)
    return decompress(raw, request.headers.get("content-encoding", "identity"))


def decompress(body: bytes, encoding: str) -> bytes:
    """tritonclient can gzip or deflate (zlib) requests; the limit holds after inflating."""
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.lower())
    if encoding.lower() == "identity":
        return body
    if wbits is None:
        raise InvalidRequestError(f"unsupported Content-Encoding {encoding!r}", "content-encoding")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, MAX_BODY_BYTES + 1)
    except zlib.error as error:
        raise InvalidRequestError(f"bad {encoding} body: {error}", "content-encoding") from None
    if len(data) > MAX_BODY_BYTES:
        raise TooLargeError(f"request body over the {MAX_BODY_BYTES}-byte limit once inflated")
    if not inflater.eof:
        raise InvalidRequestError(f"truncated {encoding} body", "content-encoding")
    return data


def split_binary_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """Binary tensor data extension: the first `header_length` bytes are JSON, the rest tensors."""
    if header_length is None:
        return parse_json_object(body), b""
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise InvalidRequestError(
            f"{HEADER_LENGTH} must be a byte count within the body, got {header_length!r}",
            HEADER_LENGTH,
        )
    length = int(header_length)
    return parse_json_object(body[:length]), body[length:]


def json_object(body: dict, key: str) -> dict:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{key} must be a JSON object", key)
    return value


def request_inputs(header: dict, binary: bytes) -> list[Tensor]:
    """The `inputs`, each from its JSON `data` or its slice of the binary section, in order."""
    entries = header.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise InvalidRequestError("inputs must be a non-empty list", "inputs")
    tensors, offset = [], 0
    for entry in entries:
        tensor, offset = _input(entry, binary, offset)
        tensors.append(tensor)
    if offset != len(binary):
        raise InvalidRequestError(
            f"the binary section has {len(binary)} bytes but the inputs' binary_data_size "
            f"add up to {offset}",
            "binary_data_size",
        )
    return tensors


def _input(entry: object, binary: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise InvalidRequestError("each input needs a name", "inputs")
    name = entry["name"]
    datatype = check_datatype(name, entry.get("datatype"))
    shape = check_shape_value(name, entry.get("shape"))
    parameters = json_object(entry, "parameters")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in entry:
            raise InvalidRequestError(f"input {name!r} has no data", name)
        tensor = Tensor(name, datatype, shape, flatten(entry["data"]), parameters)
        tensor.check_elements()
        return tensor, offset
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
        raise InvalidRequestError(
            f"input {name!r}: binary_data_size {size!r} does not fit the binary section", name
        )
    raw = binary[offset : offset + size]
    return tensor_from_bytes(name, datatype, shape, raw, parameters), offset + size


def requested_outputs(header: dict) -> dict[str, bool]:
    """Output name -> whether it goes binary; every output when none is named."""
    default_binary = json_object(header, "parameters").get("binary_data_output") is True
    entries = header.get("outputs")
    if entries is None:
        return dict.fromkeys(OUTPUT_DATATYPES, default_binary)
    if not isinstance(entries, list):
        raise InvalidRequestError("outputs must be a list", "outputs")
    outputs: dict[str, bool] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidRequestError("each output needs a name", "outputs")
        binary = json_object(entry, "parameters").get("binary_data", default_binary)
        outputs[entry["name"]] = binary is True
    check_output_names(outputs)
    return outputs


def tensor_from_value(name: str, value: object) -> Tensor:
    """A generate-extension input: a JSON value by name, its datatype read off the value."""
    data = flatten(value)
    sample = data[0] if data else ""
    if isinstance(sample, bool):
        datatype = "BOOL"
    elif isinstance(sample, int):
        datatype = "INT64"
    elif isinstance(sample, float):
        datatype = "FP64"
    else:
        datatype = "BYTES"
    return Tensor(name, datatype, [len(data)], data)


def infer_response(header: dict, tensors: list[Tensor], binary: dict[str, bool]) -> Response:
    """JSON, or with any binary output the header JSON followed by the outputs' bytes."""
    blobs, entries = [], []
    for tensor in tensors:
        entry: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary[tensor.name]:
            raw = tensor_to_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = tensor.data
        entries.append(entry)
    body = json.dumps({**header, "outputs": entries}, ensure_ascii=False).encode()
    if not blobs:
        return Response(body, media_type="application/json")
    return Response(
        body + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(body))},
    )
