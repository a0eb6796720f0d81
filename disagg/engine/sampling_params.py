"""How one request wants its tokens chosen, validated before any block is touched."""

from __future__ import annotations

import math
from dataclasses import dataclass

from disagg.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20
UINT32_LIMIT = 2**32
UINT64_LIMIT = 2**64
FLOAT32_MAX = 3.4028234663852886e38
"""The control plane's wire types (proto/control.proto: uint32 counts, uint64 seed, float
temperature): a value they cannot carry is refused here, before any block is allocated."""
PENALTY_RANGE = (-2.0, 2.0)
"""presence_penalty and frequency_penalty, as OpenAI documents them."""
LOGIT_BIAS_RANGE = (-100.0, 100.0)
"""A logit_bias value, as OpenAI documents it."""
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
"""vLLM only asks > 0; the floor keeps `logit / penalty` finite in float32."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    """How many new tokens at most."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Same seed, same tokens, whatever batch the request lands in."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the sequence, besides the model's EOS."""
    stop: tuple[str, ...] = ()
    """Strings that end the output; cut from the text, applied by the detokenizing layer."""
    ignore_eos: bool = False
    """Keep going past EOS (benchmarks use this to fix output lengths)."""
    min_tokens: int = 0
    """EOS and stop tokens are not honoured before this many new tokens."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already in the output (OpenAI)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it is already in the output (OpenAI)."""
    repetition_penalty: float = 1.0
    """Divides positive, multiplies negative logits of tokens in prompt or output (CTRL,
    Keskar et al. 2019, as transformers' RepetitionPenaltyLogitsProcessor); 1 is off."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling (OpenAI's logit_bias)."""
    logprobs: int | None = None
    """None: no logprobs; N >= 0: the chosen token's logprob plus the top N alternatives."""
    constraint: str = ""
    """The output's grammar as `ConstraintSpec.to_wire()` (disagg/grammar/spec.py); "" for none.
    A string, so it crosses the control plane as is and each engine compiles it (cached)."""
    num_resumed_tokens: int = 0
    """How many of the prompt's last tokens are output the client already has: a request
    migrated mid-stream resumes with prompt + output so far as its prompt, and its grammar
    replays these tokens, so the output continues the one document instead of starting anew,
    and presence and frequency penalties count them as output."""

    def __post_init__(self) -> None:
        self._check_counts()
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= FLOAT32_MAX):
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0, got {self.temperature}", "temperature"
            )
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.seed is not None and not 0 <= self.seed < UINT64_LIMIT:
            raise InvalidRequestError(f"seed must be in [0, 2^64), got {self.seed}", "seed")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}", "logprobs"
            )
        self._check_penalties()

    def _check_counts(self) -> None:
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens < UINT32_LIMIT:
            raise InvalidRequestError(
                f"max_tokens must be in [1, 2^32), got {self.max_tokens}", "max_tokens"
            )
        if not 0 <= self.top_k < UINT32_LIMIT:
            raise InvalidRequestError(
                f"top_k must be in [0, 2^32) (0 disables), got {self.top_k}", "top_k"
            )
        if not 0 <= self.num_resumed_tokens < UINT32_LIMIT:
            raise InvalidRequestError(
                f"num_resumed_tokens must be in [0, 2^32), got {self.num_resumed_tokens}",
                "num_resumed_tokens",
            )
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens], got {self.min_tokens}", "min_tokens"
            )

    def _check_penalties(self) -> None:
        _check_range("presence_penalty", self.presence_penalty, PENALTY_RANGE)
        _check_range("frequency_penalty", self.frequency_penalty, PENALTY_RANGE)
        _check_range("repetition_penalty", self.repetition_penalty, REPETITION_PENALTY_RANGE)
        token_ids = [token_id for token_id, _ in self.logit_bias]
        if len(set(token_ids)) != len(token_ids):
            raise InvalidRequestError("logit_bias names a token id twice", "logit_bias")
        for token_id, bias in self.logit_bias:
            if not 0 <= token_id < UINT32_LIMIT:
                raise InvalidRequestError(
                    f"logit_bias token ids must be in [0, 2^32), got {token_id}", "logit_bias"
                )
            _check_range("logit_bias", bias, LOGIT_BIAS_RANGE)

    @property
    def has_penalties(self) -> bool:
        """Whether the sampler must adjust this request's logits (penalties or logit_bias)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _check_range(name: str, value: float, bounds: tuple[float, float]) -> None:
    low, high = bounds
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRequestError(f"{name} must be in [{low}, {high}], got {value}", name)
