"""Synthetic workloads, materialized once to `workload.jsonl` so every target gets the same bytes.

Prompts are plain English words, not token-id lists, so any OpenAI-compatible
server accepts them; each prompt re-tokenizes to exactly the requested length
with the model's tokenizer (counting the special tokens the tokenizer adds
itself, as the server does when it reports `usage.prompt_tokens`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving.lengths import LengthSpec

WORDS = (
    "the of and to in is was for that with as on by at from his her an were are which this "
    "be or had not but first one their its new after who they have has been also more two "
    "time other when into all during there would city world over year people out some only "
    "school many later up known about most made between life because team could state under "
    "may music while where both part film well house work early river then through number "
    "since three against several water these before found each high light small game story "
    "long large built place north south east west road party system family history town line "
    "best market stone paper garden window morning evening summer winter bridge island forest"
).split()
MAX_ADJUST_STEPS = 64


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of the workload; `input_len` is what the tokenizer counts for `prompt`."""

    index: int
    prompt: str
    input_len: int
    output_len: int


@dataclass(frozen=True)
class SyntheticConfig:
    """A seeded synthetic workload."""

    input_len: LengthSpec = LengthSpec("fixed", 128)
    """Prompt lengths in tokens."""
    output_len: LengthSpec = LengthSpec("fixed", 64)
    """`max_tokens` per request (reached exactly when the server honours ignore_eos)."""
    num_requests: int = 100
    """Requests in the workload, warm-up included."""
    seed: int = 0
    """Same seed, same tokenizer -> byte-identical workload.jsonl."""

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens the server will count for `text` as a completion prompt."""
    return len(tokenizer(text)["input_ids"])


def exact_prompt(tokenizer: Any, rng: np.random.Generator, length: int) -> str:
    """Text of random words that re-tokenizes to exactly `length` tokens.

    Trim at a token boundary, decode, re-encode: merges across the cut can change
    the count by one or two, so repeat (trimming, or appending a word) until exact.
    """
    num_special = count_tokens(tokenizer, "")
    target = length - num_special
    if target < 1:
        raise ValueError(f"input length {length} leaves no room next to {num_special} specials")
    text = " ".join(rng.choice(WORDS, size=target + 8))
    for _ in range(MAX_ADJUST_STEPS):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == target and count_tokens(tokenizer, text) == length:
            return text
        if len(ids) > target:
            text = tokenizer.decode(ids[:target], clean_up_tokenization_spaces=False)
        else:
            text = f"{text} {rng.choice(WORDS)}"
    raise RuntimeError(f"could not build a prompt of exactly {length} tokens")


def build_synthetic(config: SyntheticConfig, tokenizer: Any) -> list[WorkloadRequest]:
    """The workload; lengths and words come from separate streams of the one seed."""
    length_rng = np.random.default_rng([config.seed, 0])
    input_lens = config.input_len.sample(length_rng, config.num_requests)
    output_lens = config.output_len.sample(length_rng, config.num_requests)
    word_rng = np.random.default_rng([config.seed, 1])
    return [
        WorkloadRequest(i, exact_prompt(tokenizer, word_rng, n_in), n_in, n_out)
        for i, (n_in, n_out) in enumerate(zip(input_lens, output_lens))
    ]


def write_workload(path: Path, requests: list[WorkloadRequest]) -> None:
    """One sorted-key JSON object a line, so equal workloads are equal bytes."""
    lines = [json.dumps(asdict(r), sort_keys=True) for r in requests]
    path.write_text("\n".join(lines) + "\n")


def read_workload(path: Path) -> list[WorkloadRequest]:
    return [WorkloadRequest(**json.loads(line)) for line in path.read_text().splitlines() if line]
