"""Chat output when tools are offered: `message.tool_calls`, or streamed `delta.tool_calls`.

The text the model wrote under the tool-call grammar is read by `ToolCallParser` into
OpenAI's shapes; a response that made calls and ended on its own says `finish_reason:
"tool_calls"`, as OpenAI's does. One that ran out of tokens mid-call keeps `length`.
"""

from __future__ import annotations

from coordinator.tool_call_parser import ParsedDelta, ToolCallParser, parse_tool_calls


def finish_with_calls(finish_reason: str | None, has_calls: bool) -> str | None:
    """`stop` becomes `tool_calls` when the output made calls."""
    return "tool_calls" if finish_reason == "stop" and has_calls else finish_reason


def tool_call_message(text: str, finish_reason: str) -> tuple[dict, str]:
    """A whole response's (message, finish_reason)."""
    content, calls = parse_tool_calls(text)
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message, finish_with_calls(finish_reason, bool(calls))


class ToolCallDeltas:
    """One parser per choice of a streamed response: text chunks in, chat deltas out."""

    def __init__(self) -> None:
        self._parsers: dict[int, ToolCallParser] = {}

    def delta(self, index: int, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The `delta` for choice `index`'s next text, and its finish_reason."""
        parser = self._parsers.setdefault(index, ToolCallParser())
        parsed = parser.push(text)
        if finish_reason is not None:
            _merge(parsed, parser.finish())
        delta: dict = {}
        if parsed.content:
            delta["content"] = parsed.content
        if parsed.tool_calls:
            delta["tool_calls"] = parsed.tool_calls
        return delta, finish_with_calls(finish_reason, bool(parser.tool_calls))


def _merge(into: ParsedDelta, more: ParsedDelta) -> None:
    into.content += more.content
    into.tool_calls += more.tool_calls
