"""Workloads from files and shapes other than the synthetic one: ShareGPT, shared prefixes, traces.

Each builder returns `WorkloadRequest`s like `build_synthetic`, from a seed, so the
same inputs give a byte-identical workload.jsonl. Lengths are what the tokenizer
counts, so the server's `usage.prompt_tokens` can be checked against them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving.lengths import LengthSpec
from bench.serving.workload import WorkloadRequest, count_tokens, exact_prompt

HUMAN_ROLES = ("human", "user")
REPLY_ROLES = ("gpt", "assistant", "chatgpt", "bard", "model")


@dataclass(frozen=True)
class LengthFilter:
    """Keep ShareGPT conversations whose token lengths fall in these inclusive ranges."""

    min_input: int = 1
    max_input: int = 1 << 20
    min_output: int = 1
    max_output: int = 1 << 20

    def keeps(self, input_len: int, output_len: int) -> bool:
        return (
            self.min_input <= input_len <= self.max_input
            and self.min_output <= output_len <= self.max_output
        )


def first_exchange(conversation: dict) -> tuple[str, str] | None:
    """(first human turn, the first reply after it), or None when there is no such pair."""
    turns = conversation.get("conversations") or conversation.get("conversation") or []
    for i, turn in enumerate(turns):
        if turn.get("from") in HUMAN_ROLES:
            reply = next((t for t in turns[i + 1 :] if t.get("from") in REPLY_ROLES), None)
            return (turn.get("value", ""), reply.get("value", "")) if reply else None
    return None


def load_sharegpt(
    path: Path, tokenizer: Any, num_requests: int, seed: int, lengths: LengthFilter
) -> list[WorkloadRequest]:
    """`num_requests` conversations drawn in a seeded order from those passing the filter.

    NOTE: the reply's token count becomes max_tokens; with --ignore-eos the server
    generates exactly that many, as the original conversation did.
    """
    conversations = json.loads(Path(path).read_text())
    order = np.random.default_rng([seed, 3]).permutation(len(conversations))
    requests: list[WorkloadRequest] = []
    for i in order:
        pair = first_exchange(conversations[i])
        if pair is None or not pair[0].strip():
            continue
        prompt, reply = pair
        input_len = count_tokens(tokenizer, prompt)
        output_len = len(tokenizer.encode(reply, add_special_tokens=False))
        if lengths.keeps(input_len, output_len):
            requests.append(WorkloadRequest(len(requests), prompt, input_len, output_len))
        if len(requests) == num_requests:
            return requests
    raise ValueError(
        f"{path}: only {len(requests)} conversations pass the length filters, "
        f"{num_requests} requested"
    )


@dataclass(frozen=True)
class SharedPrefixConfig:
    """G groups of P prompts; the prompts of a group start with the same prefix."""

    num_groups: int = 4
    prompts_per_group: int = 8
    prefix_len: int = 256
    """Tokens of each group's shared prefix."""
    suffix_len: LengthSpec = LengthSpec("fixed", 32)
    """Tokens of each prompt's own part, after the prefix."""
    output_len: LengthSpec = LengthSpec("fixed", 64)

    def __post_init__(self) -> None:
        for name in ("num_groups", "prompts_per_group", "prefix_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def build_shared_prefix(
    config: SharedPrefixConfig, tokenizer: Any, num_requests: int, seed: int
) -> list[WorkloadRequest]:
    """The G x P prompts, sent in a seeded shuffled order, cycled to `num_requests`."""
    word_rng = np.random.default_rng([seed, 4])
    length_rng = np.random.default_rng([seed, 5])
    num_prompts = config.num_groups * config.prompts_per_group
    suffix_lens = config.suffix_len.sample(length_rng, num_prompts)
    output_lens = config.output_len.sample(length_rng, num_prompts)
    prompts, num_special = [], count_tokens(tokenizer, "")
    for _ in range(config.num_groups):
        prefix = exact_prompt(tokenizer, word_rng, config.prefix_len)
        for _ in range(config.prompts_per_group):
            suffix = exact_prompt(tokenizer, word_rng, suffix_lens[len(prompts)] + num_special)
            prompts.append(f"{prefix} {suffix}")
    order = np.random.default_rng([seed, 6]).permutation(num_prompts)
    picks = [int(order[i % num_prompts]) for i in range(num_requests)]
    return [
        WorkloadRequest(i, prompts[p], count_tokens(tokenizer, prompts[p]), output_lens[p])
        for i, p in enumerate(picks)
    ]


def load_trace(
    path: Path, tokenizer: Any, num_requests: int, seed: int, time_scale: float
) -> tuple[list[WorkloadRequest], tuple[float, ...]]:
    """The first `num_requests` lines of a `{t, input_len, output_len}` JSONL trace.

    Send offsets are `(t - first t) * time_scale`: 0.5 replays twice as fast.
    """
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if len(lines) < num_requests:
        raise ValueError(f"{path}: {len(lines)} trace entries, {num_requests} requested")
    entries = sorted(lines[:num_requests], key=lambda e: float(e["t"]))
    word_rng = np.random.default_rng([seed, 7])
    workload = [
        WorkloadRequest(
            i,
            exact_prompt(tokenizer, word_rng, int(e["input_len"])),
            int(e["input_len"]),
            int(e["output_len"]),
        )
        for i, e in enumerate(entries)
    ]
    start = float(entries[0]["t"])
    return workload, tuple((float(e["t"]) - start) * time_scale for e in entries)
