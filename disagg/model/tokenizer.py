"""Text <-> tokens for serving: chat templates in, streamed text deltas out.

A server streams text, not tokens, so the output side is two small state machines:
`IncrementalDetokenizer` turns token ids into complete text without ever emitting half a
UTF-8 character, and `StopStringMatcher` holds back text that might become a stop string.
`TextStream` chains them; it is what one request's stream owns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jinja2.exceptions import TemplateError

from disagg.errors import InvalidRequestError

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")

# NOTE: a byte-level BPE tokenizer decodes an incomplete UTF-8 sequence to U+FFFD, so
# text that ends with it is held back until the next token completes the character.
REPLACEMENT_CHAR = "\ufffd"


def apply_chat_template(
    tokenizer: Any,
    messages: list[dict],
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> list[int]:
    """Render OpenAI-style chat messages with the model's own template and tokenize them;
    `tools` (OpenAI function tools) go to a template that renders them itself."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use completions", "messages")
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    normalized = [_normalize_message(i, m) for i, m in enumerate(messages)]
    try:
        result = tokenizer.apply_chat_template(
            normalized,
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            **({"tools": tools} if tools else {}),
        )
    except TemplateError as exc:  # e.g. a template that demands alternating roles
        raise InvalidRequestError(f"chat template rejected messages: {exc}", "messages") from exc
    # NOTE: transformers 5 returns a BatchEncoding here, transformers 4 a plain list.
    ids = result["input_ids"] if isinstance(result, Mapping) else result
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _normalize_message(index: int, message: object) -> dict:
    """Check one message and flatten list-of-parts content to the string templates expect."""
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise InvalidRequestError(f"messages[{index}] needs a role and a content", "messages")
    role = message["role"]
    if role not in CHAT_ROLES:
        raise InvalidRequestError(
            f"messages[{index}].role {role!r} is not one of {', '.join(CHAT_ROLES)}", "messages"
        )
    return {**message, "content": _content_text(index, message["content"])}


def _content_text(index: int, content: object) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{index}].content must be a string or a list of parts", "messages"
        )
    texts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(
                f"messages[{index}].content has a {kind!r} part; only text is supported",
                "messages",
            )
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"messages[{index}] has a text part without text", "messages")
        texts.append(part["text"])
    return "".join(texts)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Tokenize a completion prompt, with whatever special tokens the tokenizer adds itself."""
    if not isinstance(text, str):
        raise InvalidRequestError("prompt must be a string", param="prompt")
    return [int(i) for i in tokenizer(text)["input_ids"]]


class IncrementalDetokenizer:
    """Token ids in, newly completed text out, in O(1) work per token.

    Algorithm (vLLM's prefix/read offsets): keep a window of ids whose first `_read`
    were already emitted. Decode the emitted part alone and the whole window; the new
    text is the difference. Decoding with a little left context keeps the spaces that
    sentencepiece/BPE drop at the start of a decode, and once text is emitted the window
    slides forward to just those ids, so its length stays bounded.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = []
        self._read = 0  # window[:_read] is context already emitted; the rest is pending

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add tokens; return the text they complete, or "" while a character is partial."""
        self._window.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._window = self._window[self._read :]
        self._read = len(self._window)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """The sequence ended: release pending text, even an incomplete character."""
        prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)
        self._window, self._read = [], 0
        return new_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)


class StopStringMatcher:
    """Cuts streamed text just before the first stop string, never leaking part of one.

    Text is emitted only once no stop string can start inside it: a suffix that is a
    prefix of some stop string is held back until later text resolves it (or `flush`).
    Because of that, a match can only start inside the held-back text, so the search
    never looks at anything already emitted.
    """

    def __init__(self, stop: Sequence[str] | str = ()) -> None:
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop strings must be non-empty strings", param="stop")
        self.stop = stops
        self.is_stopped = False
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add a text delta; return (text safe to emit now, whether a stop string hit)."""
        if self.is_stopped:
            return "", True
        pending = self._pending + text
        cut = self._first_match(pending)
        if cut is not None:
            self.is_stopped, self._pending = True, ""
            return pending[:cut], True
        held = self._held_back_len(pending)
        self._pending = pending[len(pending) - held :]
        return pending[: len(pending) - held], False

    def flush(self) -> str:
        """The sequence ended without a stop: release what was held back."""
        text, self._pending = self._pending, ""
        return "" if self.is_stopped else text

    def _first_match(self, text: str) -> int | None:
        """Start of the earliest stop string in `text`, or None."""
        starts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(starts, default=None)

    def _held_back_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that some stop string starts with."""
        longest = max((len(s) for s in self.stop), default=1)
        for size in range(min(len(text), longest - 1), 0, -1):
            if any(s.startswith(text[-size:]) for s in self.stop):
                return size
        return 0


class TextStream:
    """One request's output text: detokenize, then apply stop strings."""

    def __init__(
        self, tokenizer: Any, stop: Sequence[str] | str = (), skip_special_tokens: bool = True
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stops = StopStringMatcher(stop)
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._parts)

    @property
    def is_stopped(self) -> bool:
        """Whether a stop string ended the text; later tokens are ignored."""
        return self._stops.is_stopped

    def push(self, token_ids: int | Iterable[int]) -> tuple[str, bool]:
        """Add tokens; return (text delta to send, whether a stop string hit)."""
        if self.is_stopped:
            return "", True
        delta, is_stopped = self._stops.push(self._detokenizer.push(token_ids))
        self._parts.append(delta)
        return delta, is_stopped

    def finish(self) -> str:
        """The sequence ended: the last delta, with any held-back text released."""
        if self.is_stopped:
            return ""
        tail, _ = self._stops.push(self._detokenizer.flush())
        tail += self._stops.flush()
        self._parts.append(tail)
        return tail
