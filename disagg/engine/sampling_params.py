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
    logprobs: int | None = None
    """None: no logprobs; N >= 0: the chosen token's logprob plus the top N alternatives."""
    constraint: str = ""
    """The output's grammar as `ConstraintSpec.to_wire()` (disagg/grammar/spec.py); "" for none.
    A string, so it crosses the control plane as is and each engine compiles it (cached)."""
    num_resumed_tokens: int = 0
    """How many of the prompt's last tokens are output the client already has: a request
    migrated mid-stream resumes with prompt + output so far as its prompt, and its grammar
    replays these tokens, so the output continues the one document instead of starting anew."""

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

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
