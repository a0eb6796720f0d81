"""What one request left behind: every timestamp, the token counts, and how it failed.

All times are `time.perf_counter_ns()` minus the run's start, so a record is
self-contained and `requests.jsonl` alone is enough to recompute every metric.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Error classes; every error is an SLO miss.
HTTP_4XX = "4xx"
HTTP_5XX = "5xx"
TIMEOUT = "timeout"
CONNECTION = "connection"
BAD_STREAM = "bad_stream"
EMPTY = "empty"
ERROR_CLASSES = (HTTP_4XX, HTTP_5XX, TIMEOUT, CONNECTION, BAD_STREAM, EMPTY)


@dataclass
class RequestRecord:
    """One request's life, filled in as it happens (hence not frozen)."""

    index: int
    """Position in workload.jsonl."""
    input_len: int
    """Prompt tokens the workload asked for (a conversation's turn: its new user message only;
    the whole prompt depends on the replies, see prompt_tokens)."""
    output_len: int
    """`max_tokens` sent."""
    is_warmup: bool = False
    """Sent like the others, left out of every metric."""
    scheduled_ns: int = 0
    """When the schedule said to send it (closed loop: when its user became free)."""
    slot_ns: int = 0
    """When it got an in-flight slot (= scheduled_ns unless the cap held it back)."""
    sent_ns: int = 0
    """Just before the request went out."""
    chunk_ns: list[int] = field(default_factory=list)
    """Arrival of each token-carrying chunk."""
    chunk_tokens: list[int] = field(default_factory=list)
    """Tokens each chunk carried (usage deltas where streamed, else 1 per non-empty chunk)."""
    end_ns: int = 0
    """When the stream ended, or the request failed."""
    status: int | None = None
    """HTTP status, None if no response arrived."""
    error: str | None = None
    """One of ERROR_CLASSES, None on success."""
    error_detail: str = ""
    """What went wrong, for humans."""
    prompt_tokens: int | None = None
    """`usage.prompt_tokens` reported by the server."""
    completion_tokens: int | None = None
    """`usage.completion_tokens` reported by the server."""
    is_usage_streamed: bool = False
    """Whether chunk_tokens came from per-chunk usage deltas (exact) or from counting chunks."""
    is_done: bool = True
    """Whether the stream ended with `data: [DONE]` (one that ends at its finish_reason
    without it is accepted, and counted under `missing_done`)."""
    server_timings: dict | None = None
    """The server's per-request timings in seconds (disagg: queue_s, prefill_s, kv_transfer_s,
    ttft_s, first_decode_gap_s), when it streams them; None for other servers."""
    repeat: int = 0
    """Which of the run's `--repeats` passes sent it."""
    cached_tokens: int | None = None
    """`usage.prompt_tokens_details.cached_tokens`: prompt tokens found in the server's prefix
    cache (not computed again); None when the server reports none."""
    conversation: int | None = None
    """Multi-turn workloads: the conversation it belongs to; None otherwise."""
    turn: int | None = None
    """Multi-turn workloads: its turn in the conversation, from 0; None otherwise."""
    reply: str | None = None
    """Multi-turn workloads: the generated text, which the next turn resends."""

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @property
    def num_output_tokens(self) -> int:
        """The server's count when it gave one, else the counted chunks."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return sum(self.chunk_tokens)


def write_records(path: Path, records: list[RequestRecord]) -> None:
    lines = [json.dumps(asdict(r), sort_keys=True) for r in records]
    path.write_text("\n".join(lines) + "\n")


def read_records(path: Path) -> list[RequestRecord]:
    return [RequestRecord(**json.loads(line)) for line in path.read_text().splitlines() if line]
