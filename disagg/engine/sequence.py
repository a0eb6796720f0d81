"""A sequence owns its tokens, its place in the KV cache and its status."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import torch

from disagg.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from disagg.grammar.state import GrammarState

_seq_counter = itertools.count()


class SequenceStatus(IntEnum):
    """Ordered: a sequence only ever moves to a larger status (preemption aside).

    A sequence lives either on one engine (WAITING -> RUNNING -> FINISHED) or is
    split across two: the prefill side goes WAITING -> PREFILLED, the decode side
    WAITING_FOR_KV -> RUNNING -> FINISHED.
    """

    WAITING = 0
    """Queued for prefill on this engine."""
    WAITING_FOR_KV = 1
    """Decode side: blocks reserved by a KV handle; the prompt's KV is arriving from a
    prefill worker. Set by the decode worker when it allocates the handle."""
    RUNNING = 2
    """Prefilled; produces one token per decode step."""
    PREFILLED = 3
    """Prefill side of a prefill-only sequence: prompt computed, first token sampled; it
    left the engine still holding its blocks, which its owner releases once shipped."""
    FINISHED = 4


class FinishReason:
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sequence:
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache."""
    num_cached_tokens: int = 0
    """Leading tokens whose K/V this engine found in its prefix cache instead of computing."""
    owns_blocks: bool = True
    """False when the blocks belong to someone else (a KV handle), who frees them."""
    is_prefill_only: bool = False
    """Leave the engine once the prompt is computed (PREFILLED): it is decoded elsewhere."""
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    """Per-sequence RNG of an unseeded sampled request (seeded ones derive theirs per draw)."""
    grammar: GrammarState | None = None
    """Where the output is in its grammar (params.constraint); set by the engine on entry."""

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"seq-{self.seq_id}"
        if not self.params.is_greedy and self.params.seed is None:
            self.generator = torch.Generator()
            self.generator.seed()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def stop_token_ids(self, eos_token_ids: set[int]) -> set[int]:
        """Tokens that end this sequence: the model's EOS (unless ignored) and the request's own."""
        eos = set() if self.params.ignore_eos else eos_token_ids
        return eos | set(self.params.stop_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
