"""Reading OpenAI request bodies into generation requests, with 400s that name the field."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.generation import DEFAULT_TENANT, GenerationRequest
from coordinator.openai_fields import (
    check_json_types,
    integer,
    max_new_tokens,
    number,
    penalties,
    stop_strings,
)
from coordinator.request_values import UINT32_LIMIT, UINT64_LIMIT, seed_value, top_k_value
from coordinator.structured_output import chat_structure, output_constraint, with_constraint
from disagg.engine.sampling_params import SamplingParams
from disagg.errors import InvalidRequestError
from disagg.model.loader import ModelInfo
from disagg.model.tokenizer import apply_chat_template, encode_prompt

MAX_N = 16
PRIORITY_LIMIT = 2**31 - 1
"""`priority` (vLLM's field: lower is sooner, among the tenant's own waiting requests)."""
UNSUPPORTED_FIELDS = {
    "functions": "function calling",
    "function_call": "function calling",
    "audio": "audio output",
    "suffix": "suffix (insertion)",
}


@dataclass
class ParsedRequest:
    """One API request: its sequences (prompts x n) and how to answer."""

    requests: list[GenerationRequest]
    stream: bool
    include_usage: bool
    logprobs: int | None
    num_prompts: int
    has_tools: bool = False
    """Tools were offered: the output is read for tool calls (coordinator.structured_output)."""


def field(body: dict, name: str, kind: type | tuple[type, ...], default: object = None) -> object:
    value = body.get(name)
    if value is None:
        return default
    allowed = kind if isinstance(kind, tuple) else (kind,)
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in allowed) or not isinstance(value, allowed):
        names = " or ".join(k.__name__ for k in allowed)
        raise InvalidRequestError(f"{name} must be {names}, got {type(value).__name__}", name)
    return value


def reject_unsupported(body: dict) -> None:
    for name, what in UNSUPPORTED_FIELDS.items():
        if body.get(name):
            raise InvalidRequestError(f"{what} is not supported by this server", name)
    if field(body, "echo", bool, False):
        raise InvalidRequestError("echo is not supported by this server", "echo")
    if field(body, "best_of", int, 1) != 1:
        raise InvalidRequestError("best_of other than 1 is not supported", "best_of")


def sampling_params(
    body: dict, max_tokens: int, logprobs: int | None, steering: dict
) -> SamplingParams:
    """OpenAI's documented ranges (see `openai_fields`); vLLM's -1 for top_k and seed.
    `steering`: the penalties and logit_bias, read once per request (`penalties`)."""
    top_k = body.get("top_k")
    seed = body.get("seed")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0, is_low_open=True),
        top_k=0 if top_k is None else top_k_value("top_k", top_k),
        seed=None if seed is None else seed_value("seed", seed),
        stop=stop_strings(body),
        ignore_eos=field(body, "ignore_eos", bool, False),
        min_tokens=integer(body, "min_tokens", 0, 0, UINT32_LIMIT - 1),
        logprobs=logprobs,
        **steering,
    )


def tenant(body: dict, header: str | None) -> str:
    return header or field(body, "user", str, None) or DEFAULT_TENANT


def expand(
    prompts: list[list[int]], body: dict, params_for: callable, tenant_name: str
) -> list[GenerationRequest]:
    """prompts x n sequences; with a seed, each of the n choices gets its own."""
    n = field(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise InvalidRequestError(f"n must be in [1, {MAX_N}]", "n")
    requests = []
    for prompt_ids in prompts:
        params = params_for(prompt_ids)
        for choice in range(n):
            seeded = params
            if params.seed is not None and choice:
                seed = (params.seed + choice) % UINT64_LIMIT
                seeded = SamplingParams(**{**params.__dict__, "seed": seed})
            requests.append(GenerationRequest(prompt_ids, seeded, tenant_name))
    return requests


def completion_prompts(body: dict, model: ModelInfo) -> list[list[int]]:
    """A string, a list of strings, token ids, or a list of token-id lists."""
    prompt = body.get("prompt")
    vocab_size = len(model.tokenizer)

    def token_ids(value: object) -> list[int] | None:
        if isinstance(value, list) and value and all(type(t) is int for t in value):
            if not all(0 <= t < vocab_size for t in value):
                raise InvalidRequestError(f"token ids must be in [0, {vocab_size})", "prompt")
            return value
        return None

    if isinstance(prompt, str):
        return [encode_prompt(model.tokenizer, prompt)]
    if token_ids(prompt) is not None:
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [encode_prompt(model.tokenizer, p) for p in prompt]
        lists = [token_ids(p) for p in prompt]
        if all(ids is not None for ids in lists):
            return lists
    raise InvalidRequestError(
        "prompt must be a string, a list of strings, token ids or lists of token ids", "prompt"
    )


def max_tokens(body: dict, prompt_len: int, model: ModelInfo, default: int | None) -> int:
    """`max_completion_tokens` or `max_tokens`; unset means what the context leaves (chat)."""
    value = max_new_tokens(body)
    if value is None:
        value = default if default is not None else max(1, model.max_model_len - prompt_len)
    return value


def parse_completion(body: dict, model: ModelInfo, tenant_header: str | None) -> ParsedRequest:
    check_json_types(body)
    reject_unsupported(body)
    steering = penalties(body, len(model.tokenizer))
    logprobs = field(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise InvalidRequestError("logprobs must be in [0, 5] for completions", "logprobs")
    prompts = completion_prompts(body, model)
    if any(not p for p in prompts):
        raise InvalidRequestError("prompt is empty", "prompt")
    constraint = output_constraint(body)
    requests = expand(
        prompts,
        body,
        lambda ids: with_constraint(
            sampling_params(body, max_tokens(body, len(ids), model, 16), logprobs, steering),
            constraint,
        ),
        tenant(body, tenant_header),
    )
    return _parsed(body, requests, logprobs, len(prompts))


def parse_chat(body: dict, model: ModelInfo, tenant_header: str | None) -> ParsedRequest:
    check_json_types(body)
    reject_unsupported(body)
    steering = penalties(body, len(model.tokenizer))
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequestError("messages must be a list of messages", "messages")
    wants_logprobs = field(body, "logprobs", bool, False)
    top = field(body, "top_logprobs", int)
    if top is not None and not (wants_logprobs and 0 <= top <= 20):
        raise InvalidRequestError(
            "top_logprobs needs logprobs=true and must be in [0, 20]", "top_logprobs"
        )
    logprobs = (top or 0) if wants_logprobs else None
    structure = chat_structure(body, model.tokenizer)
    prompt_ids = apply_chat_template(model.tokenizer, structure.messages, tools=structure.tools)
    requests = expand(
        [prompt_ids],
        body,
        lambda ids: with_constraint(
            sampling_params(body, max_tokens(body, len(ids), model, None), logprobs, steering),
            structure.constraint,
        ),
        tenant(body, tenant_header),
    )
    parsed = _parsed(body, requests, logprobs, 1)
    parsed.has_tools = structure.has_tools
    return parsed


def _parsed(
    body: dict, requests: list[GenerationRequest], logprobs: int | None, num_prompts: int
) -> ParsedRequest:
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, {})
    include_usage = bool(options.get("include_usage")) if stream else True
    priority = integer(body, "priority", 0, -PRIORITY_LIMIT, PRIORITY_LIMIT)
    for request in requests:
        request.priority = priority
    return ParsedRequest(requests, stream, include_usage, logprobs, num_prompts)
