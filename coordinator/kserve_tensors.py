"""KServe V2 tensors for a text model: their byte layout, and what they mean to this server.

Both KServe protocols carry the same tensors, so both halves here are protocol-neutral:

- **Encoding.** `Tensor` holds a name, a datatype, a shape and its elements flat in
  row-major order. `tensor_to_bytes` / `tensor_from_bytes` give the raw layout that REST's
  binary tensor data extension and gRPC's `raw_input_contents` / `raw_output_contents` share:
  numbers little-endian and packed, BYTES elements each a 4-byte little-endian length and
  then the bytes.
- **The text contract.** The prompt comes in exactly one BYTES input: `text_input` or
  `prompt` (one element per prompt: B elements are a batch of B generations), or `messages`
  (chat messages as JSON objects or JSON strings, all rendered into one prompt by the chat
  template). Sampling comes from parameters (`max_tokens`, `temperature`, `top_p`, `top_k`,
  `seed`, `stop`, `min_tokens`, `ignore_eos`, `tenant_id`), given for the request, on the
  prompt input, or as an input tensor of that name (the way Triton LLM ensembles take them),
  the more specific winning; other parameters are ignored. The answer is `text_output` and
  `finish_reason` (BYTES) and `token_count` (INT64, completion tokens), one element per prompt.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from coordinator.request_timing import merged_timings
from disagg.engine.sampling_params import SamplingParams
from disagg.errors import InvalidRequestError
from disagg.model.tokenizer import apply_chat_template, encode_prompt

MODEL_VERSION = "1"
"""The served model's only version."""
PLATFORM = "disagg"

STRUCT_FORMATS = {
    "BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q",
    "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f", "FP64": "d",
}  # fmt: skip
DATATYPES = frozenset({"BYTES", *STRUCT_FORMATS})

TEXT_INPUTS = ("text_input", "prompt", "messages")
OUTPUT_DATATYPES = {"text_output": "BYTES", "finish_reason": "BYTES", "token_count": "INT64"}

# ---------------------------------------------------------------------------------------------
# Encoding


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list
    """Elements flat, row-major: str/bytes for BYTES (JSON may also give objects), else numbers."""
    parameters: dict = field(default_factory=dict)

    def check_shape(self) -> None:
        """The shape must account for every element (`messages` alone is exempt: see module)."""
        if math.prod(self.shape) != len(self.data):
            raise InvalidRequestError(
                f"input {self.name!r} has shape {self.shape} ({math.prod(self.shape)} elements) "
                f"but {len(self.data)} elements of data",
                self.name,
            )

    def check_elements(self) -> None:
        """Elements that arrived as JSON must be of the declared datatype."""
        if self.datatype == "BYTES":
            return  # what counts as text is the text contract's call
        if not all(_is_of(self.datatype, value) for value in self.data):
            raise InvalidRequestError(
                f"input {self.name!r} has data that is not {self.datatype}", self.name
            )


def _is_of(datatype: str, value: object) -> bool:
    if datatype == "BOOL":
        return isinstance(value, bool)
    if isinstance(value, bool):  # NOTE: bool is an int subclass, but not a number here
        return False
    return isinstance(value, int | float) if datatype.startswith("FP") else isinstance(value, int)


def check_datatype(name: str, datatype: object) -> str:
    if datatype not in DATATYPES:
        raise InvalidRequestError(
            f"input {name!r} has unknown datatype {datatype!r}; use one of "
            f"{', '.join(sorted(DATATYPES))}",
            name,
        )
    return datatype


def check_shape_value(name: str, shape: object) -> list[int]:
    is_dims = isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )
    if not is_dims:
        raise InvalidRequestError(
            f"input {name!r} needs a shape: a list of non-negative integers", name
        )
    return shape


def pack_bytes(items: Iterable[str | bytes]) -> bytes:
    """BYTES elements as 4-byte little-endian lengths, each followed by its bytes."""
    parts = []
    for item in items:
        raw = item.encode() if isinstance(item, str) else item
        parts += [struct.pack("<I", len(raw)), raw]
    return b"".join(parts)


def unpack_bytes(name: str, raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequestError(f"input {name!r}: BYTES data ends inside a length", name)
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidRequestError(f"input {name!r}: a BYTES element overruns the data", name)
        items.append(raw[offset : offset + size])
        offset += size
    return items


def tensor_to_bytes(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return pack_bytes(tensor.data)
    return struct.pack(f"<{len(tensor.data)}{STRUCT_FORMATS[tensor.datatype]}", *tensor.data)


def tensor_from_bytes(
    name: str, datatype: str, shape: list[int], raw: bytes, parameters: dict | None = None
) -> Tensor:
    if datatype == "BYTES":
        data: list = unpack_bytes(name, raw)
    else:
        fmt = STRUCT_FORMATS[datatype]
        count, extra = divmod(len(raw), struct.calcsize(fmt))
        if extra:
            raise InvalidRequestError(
                f"input {name!r}: {len(raw)} bytes is not a whole number of {datatype}", name
            )
        data = list(struct.unpack(f"<{count}{fmt}", raw))
    return Tensor(name, datatype, shape, data, dict(parameters or {}))


def flatten(data: object) -> list:
    """JSON tensor data may be nested by dimension or flat; either way, row-major elements."""
    if not isinstance(data, list):
        return [data]
    flat: list = []
    stack = [iter(data)]  # NOTE: a loop, not recursion: nesting depth is the client's choice
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


# ---------------------------------------------------------------------------------------------
# The text contract


class GenerationResult(Protocol):
    """What a finished generation (`Completion`) or a streamed piece (`TextChunk`) offers."""

    text: str
    finish_reason: str | None

    @property
    def num_completion_tokens(self) -> int: ...


@dataclass
class TextRequest:
    prompts: list[list[int]]
    """Token ids, one list per generation."""
    params: SamplingParams
    tenant: str | None
    """From the `tenant_id` parameter; None leaves the choice to the protocol (e.g. a header)."""


def model_metadata(name: str) -> dict:
    """The model's V2 metadata; any one of the inputs carries the prompt."""
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in TEXT_INPUTS],
        "outputs": [
            {"name": n, "datatype": dtype, "shape": [-1]} for n, dtype in OUTPUT_DATATYPES.items()
        ],
    }


def parse_text_request(
    inputs: Sequence[Tensor], parameters: Mapping[str, Any], tokenizer: Any
) -> TextRequest:
    """Inputs and request parameters in, tokenized prompts and checked sampling out."""
    by_name = _inputs_by_name(inputs)
    prompt_inputs = [by_name[n] for n in TEXT_INPUTS if n in by_name]
    if len(prompt_inputs) != 1:
        raise InvalidRequestError(
            f"give exactly one of the inputs {', '.join(TEXT_INPUTS)}", "inputs"
        )
    text_input = prompt_inputs[0]
    merged = {**parameters, **text_input.parameters}
    for tensor in by_name.values():
        if tensor.name in PARAMETERS:
            merged[tensor.name] = _parameter_value(tensor)
    return TextRequest(
        _prompts(text_input, tokenizer), sampling_params(merged), _tenant(merged.get("tenant_id"))
    )


def _inputs_by_name(inputs: Sequence[Tensor]) -> dict[str, Tensor]:
    by_name: dict[str, Tensor] = {}
    for tensor in inputs:
        if tensor.name not in TEXT_INPUTS and tensor.name not in PARAMETERS:
            raise InvalidRequestError(
                f"unknown input {tensor.name!r}: the prompt goes in one of "
                f"{', '.join(TEXT_INPUTS)} (BYTES); inputs may also set the parameters "
                f"{', '.join(PARAMETERS)}",
                tensor.name,
            )
        if tensor.name in by_name:
            raise InvalidRequestError(f"input {tensor.name!r} is given twice", tensor.name)
        by_name[tensor.name] = tensor
    return by_name


def _prompts(tensor: Tensor, tokenizer: Any) -> list[list[int]]:
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(
            f"input {tensor.name!r} must have datatype BYTES, got {tensor.datatype}", tensor.name
        )
    if not tensor.data:
        raise InvalidRequestError(f"input {tensor.name!r} has no elements", tensor.name)
    # NOTE: `messages` ignores its shape: clients disagree on it (one element per message,
    # or [messages, 2] for role/content pairs), and the elements say all there is.
    if tensor.name == "messages":
        return [apply_chat_template(tokenizer, _messages(tensor.data))]
    tensor.check_shape()
    return [encode_prompt(tokenizer, _text(tensor.name, item)) for item in tensor.data]


def _text(name: str, item: object) -> str:
    if isinstance(item, bytes):
        try:
            return item.decode()
        except UnicodeDecodeError as error:
            raise InvalidRequestError(f"input {name!r} is not valid UTF-8: {error}", name) from None
    if isinstance(item, str):
        return item
    raise InvalidRequestError(f"input {name!r} must hold strings, got {type(item).__name__}", name)


def _messages(items: list) -> list[dict]:
    """Each element a message object, a JSON-encoded message, or a JSON-encoded list of them."""
    messages = []
    for item in items:
        if not isinstance(item, dict):
            try:
                item = json.loads(_text("messages", item))
            except (ValueError, RecursionError) as error:
                raise InvalidRequestError(
                    f"messages elements must be JSON objects: {error}", "messages"
                ) from None
        messages += item if isinstance(item, list) else [item]
    return messages


def _parameter_value(tensor: Tensor) -> object:
    """A parameter given as an input tensor: one element (`stop` may have several)."""
    tensor.check_shape()
    values = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in tensor.data]
    if tensor.name == "stop":
        return values
    if len(values) != 1:
        raise InvalidRequestError(f"input {tensor.name!r} must hold one value", tensor.name)
    return values[0]


def _tenant(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 128:
        raise InvalidRequestError(
            "tenant_id must be a string of at most 128 characters", "tenant_id"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Parameters → SamplingParams. Values are checked here for type and for the range the control
# plane can carry (uint32 counts, uint64 seed); SamplingParams checks the meaning.


def _as_int(name: str, value: object, high: int = 2**32 - 1) -> int:
    is_integral_float = isinstance(value, float) and value.is_integer()
    if is_integral_float or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise InvalidRequestError(
            f"parameter {name} must be an integer in [0, {high}], got {value!r}", name
        )
    return value


def _as_float(name: str, value: object) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise InvalidRequestError(f"parameter {name} must be a number, got {value!r}", name)
    return number


def _as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidRequestError(f"parameter {name} must be true or false, got {value!r}", name)


def _as_stop(name: str, value: object) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequestError(
            f"parameter {name} must be a non-empty string or a list of them", name
        )
    return tuple(stops)


PARAMETERS: dict[str, Callable[[str, object], object]] = {
    "max_tokens": _as_int,
    "temperature": _as_float,
    "top_p": _as_float,
    "top_k": _as_int,
    "seed": lambda name, value: _as_int(name, value, high=2**64 - 1),
    "stop": _as_stop,
    "min_tokens": _as_int,
    "ignore_eos": _as_bool,
    "tenant_id": lambda name, value: value,  # checked by _tenant
}


def sampling_params(parameters: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from V2 parameters; unknown parameters are ignored, bad ones raise."""
    fields = {
        name: coerce(name, parameters[name])
        for name, coerce in PARAMETERS.items()
        if name != "tenant_id" and parameters.get(name) is not None
    }
    return SamplingParams(**fields)


# ---------------------------------------------------------------------------------------------
# Outputs


def check_output_names(names: Iterable[str]) -> None:
    for name in names:
        if name not in OUTPUT_DATATYPES:
            raise InvalidRequestError(
                f"unknown output {name!r}; this model has {', '.join(OUTPUT_DATATYPES)}", name
            )


def output_tensors(
    results: Sequence[GenerationResult], names: Sequence[str] = tuple(OUTPUT_DATATYPES)
) -> list[Tensor]:
    """The named outputs, in that order, one element per result."""
    columns: dict[str, Callable[[GenerationResult], object]] = {
        "text_output": lambda r: r.text,
        "finish_reason": lambda r: r.finish_reason or "",
        "token_count": lambda r: r.num_completion_tokens,
    }
    check_output_names(names)
    return [
        Tensor(name, OUTPUT_DATATYPES[name], [len(results)], [columns[name](r) for r in results])
        for name in names
    ]


timing_parameters = merged_timings
