"""Multi-turn chat: the conversation builder, the turn-by-turn driver, and its metrics."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from bench.serving import conversation_driver
from bench.serving.client import RequestOptions
from bench.serving.conversation import (
    MultiTurnConfig,
    build_conversations,
    messages,
    turn_body,
)
from bench.serving.lengths import parse_length
from bench.serving.metrics import prefix_reuse, turn_summaries
from bench.serving.record import RequestRecord
from bench.serving.runner import RunPlan
from bench.serving.schedule import Schedule
from bench.serving.sse import parse_stream
from bench.serving.workload import count_tokens

ANSWER_S = 0.02


def small_config(**fields) -> MultiTurnConfig:
    defaults = dict(
        num_conversations=4,
        num_turns=3,
        system_prompt_len=40,
        num_system_prompts=2,
        turn_len=parse_length("uniform:5:12"),
        output_len=parse_length("fixed:4"),
    )
    return MultiTurnConfig(**(defaults | fields))


def test_conversations_have_exact_lengths_and_share_system_prompts(tokenizer):
    workload, conversations = build_conversations(small_config(), tokenizer, seed=2)
    assert len(workload) == 12 and [r.index for r in workload] == list(range(12))
    assert [c.request_indices for c in conversations] == [
        (0, 1, 2),
        (3, 4, 5),
        (6, 7, 8),
        (9, 10, 11),
    ]
    assert [count_tokens(tokenizer, r.prompt) for r in workload] == [r.input_len for r in workload]
    assert all(count_tokens(tokenizer, c.system_prompt) == 40 for c in conversations)
    systems = [c.system_prompt for c in conversations]
    assert systems[0] == systems[2] != systems[1] == systems[3]  # two, round-robin
    again, _ = build_conversations(small_config(), tokenizer, seed=2)
    other, _ = build_conversations(small_config(), tokenizer, seed=3)
    assert again == workload and other != workload


def test_each_turn_resends_the_conversation_with_the_replies(tokenizer):
    workload, conversations = build_conversations(small_config(), tokenizer, seed=0)
    workload, conversation = tuple(workload), conversations[1]
    user = [workload[i].prompt for i in conversation.request_indices]
    assert messages(conversation, workload, []) == [
        {"role": "system", "content": conversation.system_prompt},
        {"role": "user", "content": user[0]},
    ]
    third = messages(conversation, workload, ["first answer", "second answer"])
    assert [(m["role"], m["content"]) for m in third] == [
        ("system", conversation.system_prompt),
        ("user", user[0]),
        ("assistant", "first answer"),
        ("user", user[1]),
        ("assistant", "second answer"),
        ("user", user[2]),
    ]
    with pytest.raises(ValueError, match="no turn 4"):
        messages(conversation, workload, ["a", "b", "c"])
    chat = json.loads(turn_body(conversation, ["a1"], workload, RequestOptions(api="chat")))
    assert chat["messages"][2] == {"role": "assistant", "content": "a1"}
    assert chat["max_tokens"] == workload[conversation.request_indices[1]].output_len
    plain = json.loads(turn_body(conversation, ["a1"], workload, RequestOptions()))
    assert plain["prompt"] == "\n\n".join([conversation.system_prompt, user[0], "a1", user[1]])


def test_bad_configs_are_refused():
    for field in ("num_conversations", "num_turns", "system_prompt_len", "num_system_prompts"):
        with pytest.raises(ValueError, match=field):
            small_config(**{field: 0})


async def fake_send(client, url, body, record, start_ns, timeout_s, is_reply_kept=False):
    """Answers after ANSWER_S with a reply naming the request; keeps the body it got."""
    record.sent_ns = time.perf_counter_ns() - start_ns
    record.body = json.loads(body)
    await asyncio.sleep(ANSWER_S)
    record.chunk_ns, record.chunk_tokens = [time.perf_counter_ns() - start_ns], [1]
    record.error = "5xx" if "fail" in record.body["messages"][-1]["content"] else None
    record.reply = f"reply to {record.index}" if is_reply_kept else None
    record.end_ns = time.perf_counter_ns() - start_ns
    return record


def drive(monkeypatch, tokenizer, schedule: Schedule, think_time_s: float = 0.0, failing=()):
    """Every conversation of small_config() through the driver, with `fake_send`."""
    monkeypatch.setattr(conversation_driver, "send", fake_send)
    workload, conversations = build_conversations(small_config(), tokenizer, seed=1)
    workload = [w if w.index not in failing else type(w)(w.index, "fail", 1, 4) for w in workload]
    plan = RunPlan(
        tuple(workload),
        schedule,
        RequestOptions(api="chat"),
        conversations=tuple(conversations),
        think_time_s=think_time_s,
    )
    records = [RequestRecord(w.index, w.input_len, w.output_len) for w in workload]
    options = plan.options

    def body(conversation, replies):
        return turn_body(conversation, replies, plan.workload, options)

    async def run() -> None:
        start_ns = time.perf_counter_ns()
        await conversation_driver.drive_conversations(
            plan, "http://unused", body, records, None, start_ns, None
        )

    asyncio.run(run())
    return conversations, records


def max_overlap(records: list[RequestRecord]) -> int:
    events = sorted([(r.sent_ns, 1) for r in records] + [(r.end_ns, -1) for r in records])
    inflight = most = 0
    for _, delta in events:
        inflight += delta
        most = max(most, inflight)
    return most


@pytest.mark.parametrize(
    "schedule", [Schedule(None, 2, None), Schedule((0, 0, 0.01, 0.01), None, None)]
)
def test_a_turn_waits_for_the_previous_answer_and_conversations_overlap(
    monkeypatch, tokenizer, schedule
):
    think_s = 0.01
    conversations, records = drive(monkeypatch, tokenizer, schedule, think_s)
    for conversation in conversations:
        turns = [records[i] for i in conversation.request_indices]
        for before, after in zip(turns, turns[1:]):
            assert after.scheduled_ns == before.end_ns + think_s * 1e9
            assert after.sent_ns >= after.scheduled_ns
        assert turns[2].body["messages"][2]["content"] == f"reply to {turns[0].index}"
        assert turns[2].body["messages"][4]["content"] == f"reply to {turns[1].index}"
    assert max_overlap(records) >= 2  # several conversations in flight at once
    if schedule.concurrency:
        assert max_overlap(records) == 2


def test_a_failed_turn_ends_its_conversation(monkeypatch, tokenizer):
    _, records = drive(monkeypatch, tokenizer, Schedule(None, 4, None), failing={4})
    sent = [r.index for r in records if r.end_ns > 0]
    assert sent == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]  # conversation 1 stopped at turn 2


def record(turn: int | None, prompt: int, cached: int | None, ttft_ms: float) -> RequestRecord:
    r = RequestRecord(0, 8, 4, sent_ns=0, end_ns=int(2 * ttft_ms * 1e6))
    r.chunk_ns, r.chunk_tokens = [int(ttft_ms * 1e6)], [4]
    r.prompt_tokens, r.cached_tokens, r.turn = prompt, cached, turn
    return r


def test_prefix_reuse_is_cached_over_prompt_tokens_and_per_turn():
    records = [record(0, 100, 0, 50), record(1, 200, 150, 10), record(1, 200, 190, 20)]
    failed = record(1, 1000, 1000, 1)
    failed.error = "5xx"
    assert prefix_reuse([*records, failed]) == pytest.approx(340 / 500)
    assert prefix_reuse([record(None, 10, None, 1)]) is None
    turns = turn_summaries([*records, failed])
    assert turns["1"]["prefix_reuse"] == 0 and turns["1"]["ttft_ms"]["p50"] == 50
    assert turns["2"]["prefix_reuse"] == pytest.approx(340 / 400) and turns["2"]["num_ok"] == 2
    assert turn_summaries([record(None, 10, 0, 1)]) is None


def test_the_stream_yields_cached_tokens_and_the_reply():
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": "Hello"}}]},
        {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]},
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 90,
                "completion_tokens": 2,
                "prompt_tokens_details": {"cached_tokens": 64},
            },
        },
    ]
    reads = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
    parsed = parse_stream(list(range(len(reads))), reads)
    assert parsed.text == "Hello there" and parsed.cached_tokens == 64
    assert parsed.prompt_tokens == 90 and parsed.error is None
