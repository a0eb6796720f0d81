from __future__ import annotations

import json

from bench.serving.sse import parse_stream, split_events


def data(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def text_chunk(text: str, usage: dict | None = None) -> dict:
    chunk = {"choices": [{"index": 0, "text": text}]}
    return chunk | ({"usage": usage} if usage else {})


def test_an_event_gets_the_time_of_the_read_that_completed_it():
    first = data(text_chunk("a"))
    reads = [first[:10], first[10:] + data(text_chunk("b"))[:-1], b"\n" + data("[DONE]")]
    events = split_events([1, 2, 3], reads)
    assert [t for t, _ in events] == [2, 3, 3]
    parsed = parse_stream([1, 2, 3], reads)
    assert (parsed.chunk_ns, parsed.chunk_tokens, parsed.is_done) == ([2, 3], [1, 1], True)


def test_crlf_and_comments_are_tolerated():
    reads = [b": keep-alive\r\n\r\n", data(text_chunk("x")).replace(b"\n", b"\r\n"), data("[DONE]")]
    assert parse_stream([1, 2, 3], reads).chunk_ns == [2]


def test_final_usage_chunk_sets_counts_without_adding_a_chunk():
    usage = {"prompt_tokens": 7, "completion_tokens": 2}
    reads = [data(text_chunk("a")), data(text_chunk("b")), data({"choices": [], "usage": usage})]
    parsed = parse_stream([1, 2, 3], [*reads, data("[DONE]")])
    assert (parsed.chunk_ns, parsed.prompt_tokens, parsed.completion_tokens) == ([1, 2], 7, 2)
    assert not parsed.is_usage_streamed


def test_streamed_usage_gives_exact_tokens_per_chunk():
    reads = [
        data(text_chunk("ab", {"prompt_tokens": 3, "completion_tokens": 2})),
        data(text_chunk("c", {"prompt_tokens": 3, "completion_tokens": 3})),
        data({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}),
        data("[DONE]"),
    ]
    parsed = parse_stream([1, 2, 3, 4], reads)
    assert (parsed.chunk_tokens, parsed.is_usage_streamed) == ([2, 1], True)


def test_chat_role_and_empty_chunks_carry_no_tokens():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    content = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    parsed = parse_stream([1, 2, 3, 4], [data(role), data(content), data(finish), data("[DONE]")])
    assert parsed.chunk_ns == [2]


def test_malformed_streams_are_errors():
    assert "JSON" in parse_stream([1], [b"data: {oops\n\n"]).error
    assert "error" in parse_stream([1], [data({"error": {"message": "boom"}})]).error
    assert "DONE" in parse_stream([1], [data(text_chunk("a"))]).error


def test_a_stream_may_end_at_its_finish_reason_with_usage_beside_the_last_choice():
    """transformers serve: no [DONE], and the final count rides on the finishing chunk."""
    last = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
    last["usage"] = {"prompt_tokens": 4, "completion_tokens": 3}
    reads = [data(text_chunk("a")), data(text_chunk("b")), data(text_chunk("c")), data(last)]
    parsed = parse_stream([1, 2, 3, 4], reads)
    assert parsed.error is None and not parsed.is_done and parsed.is_finished
    assert (parsed.chunk_ns, parsed.chunk_tokens) == ([1, 2, 3], [1, 1, 1])
    assert (parsed.completion_tokens, parsed.is_usage_streamed) == (3, False)
