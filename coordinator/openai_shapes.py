"""The JSON shapes of OpenAI's completion and chat responses, chunks and logprobs.

Logprobs as OpenAI gives them: chat's `content` entries carry the token, its logprob, its
bytes (coordinator/token_bytes.py) and `top_logprobs` alternatives; legacy completions give
`tokens`, `token_logprobs`, `top_logprobs` (token -> logprob, the sampled token included, so
"up to logprobs + 1 entries") and `text_offset`, counted from the start of the choice's text
across a stream's chunks. A token the model rules out (a constraint, min_tokens) has logprob
-inf, which JSON cannot carry: it is written as -9999.0, as vLLM writes it.
"""

from __future__ import annotations

import time

from coordinator.generation import Completion, TextChunk
from coordinator.openai_protocol import ParsedRequest
from coordinator.token_bytes import token_bytes_for
from coordinator.tool_call_output import ToolCallDeltas, tool_call_message
from disagg.engine.sequence import TokenLogprob

MIN_LOGPROB = -9999.0
"""What -inf is written as (vLLM's choice): JSON has no infinity."""


def token_text(tokenizer: object, token_id: int) -> str:
    return tokenizer.decode([token_id])


def finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def usage(
    parsed: ParsedRequest, completion_counts: list[int], cached_counts: list[int] | None = None
) -> dict:
    """Each distinct prompt counts once, however many choices it has (as OpenAI counts).

    cached_counts: per request, the prompt tokens found in a prefix cache (not computed);
    a prompt's count is its first choice's."""
    per_choice = len(parsed.requests) // parsed.num_prompts
    firsts = [i * per_choice for i in range(parsed.num_prompts)]
    prompt = sum(len(parsed.requests[i].prompt_ids) for i in firsts)
    cached = sum(cached_counts[i] for i in firsts) if cached_counts else 0
    completion = sum(completion_counts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class Shape:
    id_prefix = ""
    object_name = ""
    chunk_object = ""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer

    def envelope(
        self, response_id: str, created: int, model: str, choices: list, chunk: bool = True
    ) -> dict:
        kind = self.chunk_object if chunk else self.object_name
        return {
            "id": response_id,
            "object": kind,
            "created": created,
            "model": model,
            "choices": choices,
        }

    def opening_chunks(self, response_id: str, created: int, model: str, index: int) -> list[dict]:
        return []

    def response(
        self, response_id: str, model: str, completions: list[Completion], parsed: ParsedRequest
    ) -> dict:
        choices = [self.choice(i, c, parsed) for i, c in enumerate(completions)]
        return self.envelope(response_id, int(time.time()), model, choices, chunk=False)

    def choice(self, index: int, completion: Completion, parsed: ParsedRequest) -> dict:
        raise NotImplementedError

    def chunk(self, response_id, created, model, index, chunk: TextChunk, parsed) -> dict:
        raise NotImplementedError


class CompletionShape(Shape):
    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, tokenizer: object) -> None:
        super().__init__(tokenizer)
        self._text_offsets: dict[int, int] = {}  # one response's streamed text so far, by choice

    def choice(self, index: int, completion: Completion, parsed: ParsedRequest) -> dict:
        return {
            "index": index,
            "text": completion.text,
            "logprobs": self._logprobs(index, completion.logprobs, parsed),
            "finish_reason": completion.finish_reason,
        }

    def chunk(self, response_id, created, model, index, chunk: TextChunk, parsed) -> dict:
        choice = {
            "index": index,
            "text": chunk.text,
            "logprobs": self._logprobs(index, chunk.logprobs, parsed),
            "finish_reason": chunk.finish_reason,
        }
        return self.envelope(response_id, created, model, [choice])

    def _logprobs(
        self, index: int, logprobs: list[TokenLogprob], parsed: ParsedRequest
    ) -> dict | None:
        if parsed.logprobs is None:
            return None
        tokens = [token_text(self.tokenizer, lp.token_id) for lp in logprobs]
        offsets = []
        for token in tokens:
            offsets.append(self._text_offsets.get(index, 0))
            self._text_offsets[index] = offsets[-1] + len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [finite(lp.logprob) for lp in logprobs],
            "top_logprobs": [self._top(lp) for lp in logprobs],
            "text_offset": offsets,
        }

    def _top(self, logprob: TokenLogprob) -> dict[str, float]:
        """The alternatives and the sampled token, most likely first."""
        pairs = [*logprob.top, (logprob.token_id, logprob.logprob)]
        top: dict[str, float] = {}
        for token_id, value in sorted(pairs, key=lambda pair: -pair[1]):
            top.setdefault(token_text(self.tokenizer, token_id), finite(value))
        return top


class ChatShape(Shape):
    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, tokenizer: object) -> None:
        super().__init__(tokenizer)
        self._tool_deltas = ToolCallDeltas()  # one response's streamed calls, by choice

    def opening_chunks(self, response_id: str, created: int, model: str, index: int) -> list[dict]:
        """A chat stream's first delta for each choice carries the role."""
        choice = {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [self.envelope(response_id, created, model, [choice])]

    def choice(self, index: int, completion: Completion, parsed: ParsedRequest) -> dict:
        message = {"role": "assistant", "content": completion.text}
        finish_reason = completion.finish_reason
        if parsed.has_tools:
            message, finish_reason = tool_call_message(completion.text, finish_reason)
        return {
            "index": index,
            "message": message,
            "logprobs": self._logprobs(completion.logprobs, parsed),
            "finish_reason": finish_reason,
        }

    def chunk(self, response_id, created, model, index, chunk: TextChunk, parsed) -> dict:
        delta = {"content": chunk.text} if chunk.text else {}
        finish_reason = chunk.finish_reason
        if parsed.has_tools:
            delta, finish_reason = self._tool_deltas.delta(index, chunk.text, finish_reason)
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": self._logprobs(chunk.logprobs, parsed),
            "finish_reason": finish_reason,
        }
        return self.envelope(response_id, created, model, [choice])

    def _logprobs(self, logprobs: list[TokenLogprob], parsed: ParsedRequest) -> dict | None:
        if parsed.logprobs is None:
            return None
        token_bytes = token_bytes_for(self.tokenizer)

        def entry(token_id: int, logprob: float) -> dict:
            text = token_text(self.tokenizer, token_id)
            return {"token": text, "logprob": finite(logprob), "bytes": list(token_bytes(token_id))}

        return {
            "content": [
                {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                for lp in logprobs
            ],
            "refusal": None,
        }
