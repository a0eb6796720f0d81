"""From raw stream reads to token arrivals, after the request is over.

The client's hot path only appends (timestamp, bytes) per network read; this
module splits the bytes into SSE events afterwards and gives each event the
time of the read that completed it, which is when the client could first have
seen it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class ParsedStream:
    """Token arrivals and final counts of one streamed response."""

    chunk_ns: list[int] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    """`usage.prompt_tokens_details.cached_tokens`: prompt tokens the server found in a prefix
    cache; None when it reports none."""
    text: str = ""
    """The generated text, every choice's pieces in arrival order."""
    is_usage_streamed: bool = False
    server_timings: dict | None = None
    """The server's own account of the request (`metrics` in disagg's final chunk)."""
    is_done: bool = False
    """Whether `data: [DONE]` arrived."""
    is_finished: bool = False
    """Whether a choice carried a finish_reason (some servers end there, without [DONE])."""
    error: str | None = None
    """Why the stream is malformed or carried an error object, None if it is fine."""


def split_events(read_ns: list[int], reads: list[bytes]) -> list[tuple[int, bytes]]:
    """(time of the read that completed it, payload) for every `data:` event."""
    events: list[tuple[int, bytes]] = []
    buffer = b""
    for t_ns, data in zip(read_ns, reads):
        buffer += data.replace(b"\r\n", b"\n")
        *complete, buffer = buffer.split(b"\n\n")
        events.extend((t_ns, payload) for block in complete if (payload := _data(block)))
    if buffer.strip() and (payload := _data(buffer)) and read_ns:
        events.append((read_ns[-1], payload))
    return events


def _data(block: bytes) -> bytes:
    """The `data:` lines of one SSE event, joined; comments and other fields dropped."""
    lines = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


def chunk_text(chunk: dict) -> str:
    """Generated text in a completions or chat chunk ('' for role-only or usage-only chunks)."""
    text = ""
    for choice in chunk.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


def parse_stream(read_ns: list[int], reads: list[bytes]) -> ParsedStream:
    parsed = ParsedStream()
    for t_ns, payload in split_events(read_ns, reads):
        if payload.strip() == b"[DONE]":
            parsed.is_done = True
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            parsed.error = f"not JSON: {payload[:80]!r}"
            return parsed
        if not isinstance(chunk, dict) or "error" in chunk:
            parsed.error = f"error in stream: {str(chunk)[:200]}"
            return parsed
        _add_chunk(parsed, t_ns, chunk)
    if not (parsed.is_done or parsed.is_finished):
        parsed.error = "stream ended without [DONE] or a finish_reason"
    return parsed


def _add_chunk(parsed: ParsedStream, t_ns: int, chunk: dict) -> None:
    """Count a chunk's tokens: its usage delta where usage is streamed, else 1 if it has text.

    Usage is streamed when it rides with the choices from the first token on; usage
    that first turns up on a later chunk is the final count, even beside a choice.
    """
    timings = chunk.get("metrics")
    if isinstance(timings, list) and timings and isinstance(timings[0], dict):
        parsed.server_timings = timings[0]
    elif isinstance(timings, dict):
        parsed.server_timings = timings
    choices = chunk.get("choices") or []
    parsed.is_finished |= any(isinstance(c, dict) and c.get("finish_reason") for c in choices)
    usage = chunk.get("usage") or {}
    text = chunk_text(chunk)
    parsed.text += text
    has_text = bool(text)
    if usage:
        parsed.prompt_tokens = usage.get("prompt_tokens", parsed.prompt_tokens)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            parsed.cached_tokens = details["cached_tokens"]
        completion = usage.get("completion_tokens")
        is_per_chunk = parsed.is_usage_streamed or not parsed.chunk_ns
        if completion is not None and choices and is_per_chunk:
            delta = completion - (parsed.completion_tokens or 0)
            parsed.is_usage_streamed = True
            parsed.completion_tokens = completion
            if delta > 0:
                parsed.chunk_ns.append(t_ns)
                parsed.chunk_tokens.append(delta)
            return
        parsed.completion_tokens = completion
    if has_text:
        parsed.chunk_ns.append(t_ns)
        parsed.chunk_tokens.append(1)
