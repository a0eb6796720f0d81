"""Multi-turn chat: conversations whose every turn resends the whole conversation so far.

A conversation is a system prompt and T user messages, all built before the run
(seeded, each message exactly `--input-len` tokens, like the synthetic workload).
What cannot be built before the run is the assistant's part: turn k's request
carries the system prompt, the user messages of turns 1..k and the replies to
turns 1..k-1 as the server streamed them, which is what a chat client sends. So
the body of a turn is built when its previous answer has arrived
(bench/serving/conversation_driver.py sends them).

With prefix caching, everything but the newest reply and user message is a prefix
the server has seen; how much of it the server found is its
`usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving.client import RequestOptions, request_body
from bench.serving.lengths import LengthSpec
from bench.serving.workload import WorkloadRequest, exact_prompt

TRANSCRIPT_SEPARATOR = "\n\n"
"""Between the messages of a completions prompt, which has no roles."""


@dataclass(frozen=True)
class MultiTurnConfig:
    """N conversations of T turns; K distinct system prompts shared round-robin."""

    num_conversations: int = 8
    """Conversations in the workload, warm-up included."""
    num_turns: int = 4
    """User messages per conversation, each one request."""
    system_prompt_len: int = 256
    """Tokens of each system prompt."""
    num_system_prompts: int = 1
    """Distinct system prompts; conversation i gets prompt i mod K (1: one application's)."""
    turn_len: LengthSpec = LengthSpec("fixed", 32)
    """Tokens of each user message."""
    output_len: LengthSpec = LengthSpec("fixed", 32)
    """`max_tokens` of each turn."""

    def __post_init__(self) -> None:
        for name in ("num_conversations", "num_turns", "system_prompt_len", "num_system_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Conversation:
    """One conversation: its system prompt and the workload requests of its turns, in order.

    Each turn's `WorkloadRequest` carries that turn's user message as `prompt` (its
    tokens as `input_len`) and its `max_tokens` as `output_len`.
    """

    index: int
    system_prompt: str
    request_indices: tuple[int, ...]
    """Positions in the workload of turn 1, 2, ..."""


def build_conversations(
    config: MultiTurnConfig, tokenizer: Any, seed: int
) -> tuple[list[WorkloadRequest], list[Conversation]]:
    """(the turns as a flat workload, conversation after conversation; the conversations)."""
    word_rng = np.random.default_rng([seed, 8])
    length_rng = np.random.default_rng([seed, 9])
    num_requests = config.num_conversations * config.num_turns
    turn_lens = config.turn_len.sample(length_rng, num_requests)
    output_lens = config.output_len.sample(length_rng, num_requests)
    system_prompts = [
        exact_prompt(tokenizer, word_rng, config.system_prompt_len)
        for _ in range(config.num_system_prompts)
    ]
    workload = [
        WorkloadRequest(i, exact_prompt(tokenizer, word_rng, n_in), n_in, n_out)
        for i, (n_in, n_out) in enumerate(zip(turn_lens, output_lens))
    ]
    conversations = [
        Conversation(
            c,
            system_prompts[c % config.num_system_prompts],
            tuple(range(c * config.num_turns, (c + 1) * config.num_turns)),
        )
        for c in range(config.num_conversations)
    ]
    return workload, conversations


def messages(
    conversation: Conversation, workload: tuple[WorkloadRequest, ...], replies: list[str]
) -> list[dict]:
    """The chat messages of turn `len(replies) + 1`: system, then user/assistant pairs, then
    this turn's user message. `replies` are the answers to the earlier turns, verbatim."""
    turn = len(replies)
    if turn >= len(conversation.request_indices):
        raise ValueError(f"conversation {conversation.index} has no turn {turn + 1}")
    chat = [{"role": "system", "content": conversation.system_prompt}]
    for index, reply in zip(conversation.request_indices, replies):
        chat.append({"role": "user", "content": workload[index].prompt})
        chat.append({"role": "assistant", "content": reply})
    chat.append({"role": "user", "content": workload[conversation.request_indices[turn]].prompt})
    return chat


def turn_body(
    conversation: Conversation,
    replies: list[str],
    workload: tuple[WorkloadRequest, ...],
    options: RequestOptions,
    extra: dict | None = None,
) -> bytes:
    """The request body of the next turn: the chat messages, or for `--api completions`
    their contents joined into one transcript (a client without roles resends that)."""
    chat = messages(conversation, workload, replies)
    request = workload[conversation.request_indices[len(replies)]]
    if options.api == "chat":
        return request_body(request, options, extra, chat)
    transcript = TRANSCRIPT_SEPARATOR.join(m["content"] for m in chat)
    return request_body(replace(request, prompt=transcript), options, extra)


def write_conversations(path: Path, conversations: list[Conversation]) -> None:
    """One sorted-key JSON object a line, beside workload.jsonl (which holds the turns)."""
    lines = [json.dumps(asdict(c), sort_keys=True) for c in conversations]
    path.write_text("\n".join(lines) + "\n")
