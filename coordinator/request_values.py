"""Values every protocol reads the same way, checked at the front door: text that must be valid
Unicode, `logit_bias` objects, and the integers whose client conventions (`-1` for "random"
or "off") and ranges differ from the control plane's unsigned wire fields
(`proto/control.proto`: uint64 seed, uint32 top_k). A value that cannot be carried is a 400
naming its field here, before any KV block is allocated, rather than an error when the
control message is written."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from disagg.engine.sampling_params import LOGIT_BIAS_RANGE
from disagg.errors import InvalidRequestError

UINT32_LIMIT = 2**32
UINT64_LIMIT = 2**64
INT64_MIN = -(2**63)
RANDOM_SEED = -1
"""What clients (OpenAI SDK examples, vLLM) send to mean "no seed"."""
TOP_K_OFF = -1
"""vLLM's way of saying "top_k disabled"; the wire's is 0."""


def check_text(name: str, text: str) -> str:
    """`text` if it is valid Unicode; a lone UTF-16 surrogate ("\\ud83d", which JSON allows and
    no tokenizer can encode) is a 400 naming `name`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(
            f"{name} is not valid Unicode: a lone surrogate at index {error.start}", name
        ) from None
    return text


def check_texts(name: str, value: object) -> None:
    """Every string inside `value` (message lists, content parts, dict values) is valid text."""
    if isinstance(value, str):
        check_text(name, value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_texts(name, key)
            check_texts(name, item)
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray)):
        for item in value:
            check_texts(name, item)


def _require_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__}", name)
    return value


def seed_value(name: str, value: object) -> int | None:
    """The wire's uint64 seed: -1 means random (None); other negative seeds (signed 64-bit, as
    gRPC int64 parameters carry them) keep their bits; outside [-2^63, 2^64) is a 400."""
    seed = _require_int(name, value)
    if seed == RANDOM_SEED:
        return None
    if not INT64_MIN <= seed < UINT64_LIMIT:
        raise InvalidRequestError(f"{name} must be in [-2^63, 2^64), got {seed}", name)
    return seed % UINT64_LIMIT


def top_k_value(name: str, value: object) -> int:
    """The wire's uint32 top_k: -1 and 0 mean off (0); [1, 2^32) keeps that many tokens."""
    top_k = _require_int(name, value)
    if top_k == TOP_K_OFF:
        return 0
    if not 0 <= top_k < UINT32_LIMIT:
        raise InvalidRequestError(
            f"{name} must be -1 (off), 0 (off) or in [1, 2^32), got {top_k}", name
        )
    return top_k


def logit_bias_value(name: str, value: object, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: an object of token id (a decimal string, as JSON keys are) ->
    bias in [-100, 100]. Returns (token id, bias) pairs sorted by id, as SamplingParams
    keeps them."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{name} must be an object of token id -> bias", name)
    pairs = []
    for key, bias in value.items():
        token_id = key if type(key) is int else int(key) if _is_decimal(key) else None
        if token_id is None or not 0 <= token_id < vocab_size:
            raise InvalidRequestError(f"{name} keys must be token ids in [0, {vocab_size})", name)
        low, high = LOGIT_BIAS_RANGE
        is_number = isinstance(bias, (int, float)) and not isinstance(bias, bool)
        if not (is_number and math.isfinite(bias) and low <= bias <= high):
            raise InvalidRequestError(
                f"{name} values must be numbers in [{low}, {high}], got {bias!r}", name
            )
        pairs.append((token_id, float(bias)))
    if len({token_id for token_id, _ in pairs}) != len(pairs):
        raise InvalidRequestError(f"{name} names a token id twice", name)
    return tuple(sorted(pairs))


def _is_decimal(key: object) -> bool:
    return isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10
