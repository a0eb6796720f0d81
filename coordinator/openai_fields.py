"""OpenAI request fields with the ranges OpenAI documents, each refused with a 400 that names it.

Ranges (platform.openai.com/docs/api-reference): temperature [0, 2], top_p (0, 1] (0 would
keep no token), presence_penalty and frequency_penalty [-2, 2], logit_bias values
[-100, 100], stop up to 4 strings. Extensions clients send to vLLM-style servers keep vLLM's
meaning: `top_k` -1 is off, `seed` -1 is random, `repetition_penalty` > 0 (here [1e-6, 1e6], so
that a logit divided by it stays finite), `min_tokens` >= 0.
`max_tokens`/`max_completion_tokens` of 0 is a 400, as vLLM answers it (a zero is a value,
never "unset"); null is unset.
"""

from __future__ import annotations

import math

from coordinator.request_values import UINT32_LIMIT, check_text, logit_bias_value
from disagg.engine.sampling_params import PENALTY_RANGE, REPETITION_PENALTY_RANGE
from disagg.errors import InvalidRequestError

MAX_STOP_SEQUENCES = 4


def number(
    body: dict, name: str, default: float, low: float, high: float, is_low_open: bool = False
) -> float:
    """A finite JSON number in [low, high] (or (low, high]); NaN and Infinity are 400s."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {type(value).__name__}", name)
    number = float(value)
    low_ok = number > low if is_low_open else number >= low
    if not (math.isfinite(number) and low_ok and number <= high):
        opening = "(" if is_low_open else "["
        raise InvalidRequestError(f"{name} must be in {opening}{low}, {high}], got {value}", name)
    return number


def integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    """A JSON integer in [low, high]; null is `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__}", name)
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be in [{low}, {high}], got {value}", name)
    return value


def max_new_tokens(body: dict) -> int | None:
    """`max_completion_tokens`, else `max_tokens`; None when both are unset (null or absent)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = integer(body, name, None, 1, UINT32_LIMIT - 1)
        if value is not None:
            return value
    return None


def stop_strings(body: dict) -> tuple[str, ...]:
    """`stop`: one string or up to 4, none empty."""
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequestError("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(f"stop takes at most {MAX_STOP_SEQUENCES} sequences", "stop")
    return tuple(check_text("stop", s) for s in stops)


def penalties(body: dict, vocab_size: int) -> dict:
    """The penalties and logit_bias, range-checked as documented, as SamplingParams keywords."""
    return {
        "presence_penalty": number(body, "presence_penalty", 0.0, *PENALTY_RANGE),
        "frequency_penalty": number(body, "frequency_penalty", 0.0, *PENALTY_RANGE),
        "repetition_penalty": number(body, "repetition_penalty", 1.0, *REPETITION_PENALTY_RANGE),
        "logit_bias": logit_bias_value("logit_bias", body.get("logit_bias"), vocab_size),
    }


JSON_TYPES = {
    "response_format": (dict,),
    "stream_options": (dict,),
    "tools": (list,),
    "tool_choice": (str, dict),
    "messages": (list,),
}
"""Structured fields whose parsers assume a shape: a wrong one is a 400 here, not a crash."""


def check_json_types(body: dict) -> None:
    for name, kinds in JSON_TYPES.items():
        value = body.get(name)
        if value is not None and not isinstance(value, kinds):
            names = " or ".join("object" if k is dict else k.__name__ for k in kinds)
            names = names.replace("list", "array").replace("str", "string")
            raise InvalidRequestError(f"{name} must be {names}, got {type(value).__name__}", name)
