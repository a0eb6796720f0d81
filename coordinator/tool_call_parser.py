"""Generated text to OpenAI tool calls, incrementally: `delta.tool_calls` as text streams in.

The parser is a three-state machine over the call format of `disagg.grammar.spec`:

- text: content, except a suffix that might be the start of `<tool_call>` is held back;
- header: after `<tool_call>`, buffered until `{"name": "...", "arguments": ` is complete,
  then one delta opens the call (`index`, `id`, `type`, `function.name`, empty arguments);
- arguments: streamed as they arrive, holding back a suffix that might start the closing
  `}\\n</tool_call>`; that closing ends the call and returns to text.

Deltas follow OpenAI's streaming shape, which the SDK's stream helpers assemble by `index`.
`parse_tool_calls` runs the same machine over a whole text, so a streamed response and a
non-streamed one carry identical arguments strings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.tool_calls import new_tool_call_id
from disagg.grammar.spec import TOOL_CALL_BEGIN, TOOL_CALL_SUFFIX

_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
MAX_HEADER_CHARS = 1024
"""A header longer than this is not a call: its text goes out as content."""


@dataclass
class ParsedDelta:
    """What one push adds: content text and tool-call deltas (OpenAI `delta.tool_calls`)."""

    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)


class ToolCallParser:
    """Feed text deltas in order; read the deltas back, and the assembled message at the end."""

    def __init__(self, new_id: Callable[[], str] = new_tool_call_id) -> None:
        self._new_id = new_id
        self._state = "text"
        self._pending = ""
        self._content: list[str] = []
        self.tool_calls: list[dict] = []
        """The calls so far in `message.tool_calls` shape (arguments as a JSON string)."""

    @property
    def content(self) -> str | None:
        """Text outside calls, stripped; None when there is none (OpenAI's null content)."""
        text = "".join(self._content).strip()
        return text or None

    def push(self, text: str) -> ParsedDelta:
        self._pending += text
        delta = ParsedDelta()
        while self._step(delta):
            pass
        return delta

    def finish(self) -> ParsedDelta:
        """The text ended: release what was held back (an unclosed call keeps its arguments)."""
        delta = ParsedDelta()
        pending, self._pending = self._pending, ""
        if self._state == "arguments":
            self._add_arguments(delta, pending)
        elif self._state == "header":
            self._add_content(delta, TOOL_CALL_BEGIN + pending)
        else:
            self._add_content(delta, pending)
        return delta

    def _step(self, delta: ParsedDelta) -> bool:
        """Consume what can be decided now; True if the state changed and more may follow."""
        if self._state == "text":
            return self._step_text(delta)
        if self._state == "header":
            return self._step_header(delta)
        return self._step_arguments(delta)

    def _step_text(self, delta: ParsedDelta) -> bool:
        start = self._pending.find(TOOL_CALL_BEGIN)
        if start >= 0:
            self._add_content(delta, self._pending[:start])
            self._pending = self._pending[start + len(TOOL_CALL_BEGIN) :]
            self._state = "header"
            return True
        held = _held_back_len(self._pending, TOOL_CALL_BEGIN)
        self._add_content(delta, self._pending[: len(self._pending) - held])
        self._pending = self._pending[len(self._pending) - held :]
        return False

    def _step_header(self, delta: ParsedDelta) -> bool:
        match = _HEADER.match(self._pending)
        if match is None or match.end() == len(self._pending):
            if len(self._pending) > MAX_HEADER_CHARS:
                self._add_content(delta, TOOL_CALL_BEGIN + self._pending)
                self._pending, self._state = "", "text"
                return True
            return False  # NOTE: the whitespace before the arguments may still grow
        self._open_call(delta, json.loads(match.group(1)))
        self._pending = self._pending[match.end() :]
        self._state = "arguments"
        return True

    def _step_arguments(self, delta: ParsedDelta) -> bool:
        end = self._pending.find(TOOL_CALL_SUFFIX)
        if end >= 0:
            self._add_arguments(delta, self._pending[:end])
            self._pending = self._pending[end + len(TOOL_CALL_SUFFIX) :]
            self._state = "text"
            return True
        held = _held_back_len(self._pending, TOOL_CALL_SUFFIX)
        self._add_arguments(delta, self._pending[: len(self._pending) - held])
        self._pending = self._pending[len(self._pending) - held :]
        return False

    def _open_call(self, delta: ParsedDelta, name: str) -> None:
        call_id = self._new_id()
        index = len(self.tool_calls)
        self.tool_calls.append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        )
        function = {"name": name, "arguments": ""}
        delta.tool_calls.append(
            {"index": index, "id": call_id, "type": "function", "function": function}
        )

    def _add_arguments(self, delta: ParsedDelta, text: str) -> None:
        if not text:
            return
        self.tool_calls[-1]["function"]["arguments"] += text
        index = len(self.tool_calls) - 1
        delta.tool_calls.append({"index": index, "function": {"arguments": text}})

    def _add_content(self, delta: ParsedDelta, text: str) -> None:
        self._content.append(text)
        delta.content += text


def _held_back_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that `marker` starts with (short of all of it)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def parse_tool_calls(
    text: str, new_id: Callable[[], str] = new_tool_call_id
) -> tuple[str | None, list[dict]]:
    """A whole response's (content, tool_calls); finish_reason is "tool_calls" if any."""
    parser = ToolCallParser(new_id)
    parser.push(text)
    parser.finish()
    return parser.content, parser.tool_calls
