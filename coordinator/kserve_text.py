"""What KServe V2 tensors mean to this text model, for both KServe protocols.

The prompt comes in exactly one BYTES input: `text_input` or `prompt` (one element per
prompt: B elements are a batch of B generations), or `messages` (chat messages as JSON
objects or JSON strings, all rendered into one prompt by the chat template). Sampling comes
from parameters (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`,
`min_tokens`, `ignore_eos`, `presence_penalty`, `frequency_penalty`, `repetition_penalty`,
`logit_bias` (an object, or its JSON text where only scalars travel, as in gRPC),
`tenant_id`), given for the request, on the prompt input, or as
an input tensor of that name (the way Triton LLM ensembles take them), the more specific
winning; other parameters are ignored. The answer is `text_output` and `finish_reason`
(BYTES) and `token_count` (INT64, completion tokens), one element per prompt.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator.frontend import MODEL_VERSION
from coordinator.kserve_tensor import Tensor
from coordinator.request_values import (
    check_text,
    check_texts,
    logit_bias_value,
    seed_value,
    top_k_value,
)
from coordinator.structured_output import with_kserve_constraint
from disagg.engine.sampling_params import SamplingParams
from disagg.errors import InvalidRequestError
from disagg.model.tokenizer import apply_chat_template, encode_prompt

PLATFORM = "disagg"
TEXT_INPUTS = ("text_input", "prompt", "messages")
OUTPUT_DATATYPES = {"text_output": "BYTES", "finish_reason": "BYTES", "token_count": "INT64"}


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
        _prompts(text_input, tokenizer),
        with_kserve_constraint(sampling_params(merged, tokenizer), merged),
        _tenant(merged.get("tenant_id")),
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
        return check_text(name, item)
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
    check_texts("messages", messages)
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
# plane can carry (uint32 counts, uint64 seed; `seed` -1 is random and `top_k` -1 off, as in
# the OpenAI API); SamplingParams checks the meaning.


def _integral(value: object) -> object:
    """Integers as JSON, gRPC and Triton clients spell them: 3, 3.0, "3"; others unchanged."""
    is_integral_float = isinstance(value, float) and value.is_integer()
    if is_integral_float or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        return int(value)
    return value


def _as_int(name: str, value: object, high: int = 2**32 - 1) -> int:
    value = _integral(value)
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


def _json_object(name: str, value: object) -> object:
    """An object as REST sends it, or its JSON text (gRPC parameters are scalars only)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise InvalidRequestError(f"parameter {name} must be a JSON object", name) from None


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
    "top_k": lambda name, value: top_k_value(name, _integral(value)),
    "seed": lambda name, value: seed_value(name, _integral(value)),
    "stop": _as_stop,
    "min_tokens": _as_int,
    "ignore_eos": _as_bool,
    "presence_penalty": _as_float,
    "frequency_penalty": _as_float,
    "repetition_penalty": _as_float,
    "logit_bias": lambda name, value: _json_object(name, value),  # ids checked below
    "tenant_id": lambda name, value: value,  # checked by _tenant
}


def sampling_params(parameters: Mapping[str, Any], tokenizer: Any) -> SamplingParams:
    """SamplingParams from V2 parameters; unknown parameters are ignored, bad ones raise.
    `logit_bias` ids must be in the tokenizer's vocabulary."""
    fields = {
        name: coerce(name, parameters[name])
        for name, coerce in PARAMETERS.items()
        if name != "tenant_id" and parameters.get(name) is not None
    }
    if "logit_bias" in fields:
        bias = fields["logit_bias"]
        fields["logit_bias"] = logit_bias_value("logit_bias", bias, len(tokenizer))
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
