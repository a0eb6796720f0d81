"""`disagg-bench run --workload multi-turn` end to end: on loopback, and on the in-process
cluster, whose prefix cache finds each turn's resent conversation."""

from __future__ import annotations

import json

from bench.cli import main
from bench.serving.record import read_records


def run_multi_turn(out, url: str, *extra: str) -> int:
    return main([
        "run", "--target", f"chat={url}", "--workload", "multi-turn", "--api", "chat",
        "--num-conversations", "3", "--turns", "3", "--system-prompt-len", "48",
        "--input-len", "fixed:12", "--output-len", "fixed:6", "--seed", "4",
        "--slo", "ttft<=10s", "-o", str(out), *extra,
    ])  # fmt: skip


def by_conversation(records) -> dict[int, list]:
    conversations: dict[int, list] = {}
    for r in sorted(records, key=lambda r: (r.conversation, r.turn)):
        conversations.setdefault(r.conversation, []).append(r)
    return conversations


def test_loopback_run_records_turns_and_prints_them(tmp_path, loopback, capsys):
    out = tmp_path / "run"
    assert run_multi_turn(out, loopback.url("ok"), "--load", "closed:2", "--warmup", "1") == 0
    records = read_records(out / "chat" / "requests.jsonl")
    assert len(records) == 12 and sum(r.is_warmup for r in records) == 3
    for turns in by_conversation(records).values():
        assert [r.turn for r in turns] == [0, 1, 2]
        prompts = [r.prompt_tokens for r in turns]
        assert prompts[0] < prompts[1] < prompts[2]  # the loopback counts every message
        for before, after in zip(turns, turns[1:]):
            assert before.end_ns <= after.scheduled_ns <= after.sent_ns
            assert before.reply and before.reply.startswith("tok")
    assert len((out / "conversations.jsonl").read_text().splitlines()) == 4
    summary = json.loads((out / "chat" / "run.json").read_text())["summary"]
    assert summary["num_ok"] == 9 and summary["prompt_token_mismatches"] == 0
    assert summary["turns"]["3"]["num_ok"] == 3 and summary["prefix_reuse"] is None
    table = capsys.readouterr().out
    assert "turn 3: TTFT sent p50 (ms)" in table and "prefix reuse" not in table


def test_multi_turn_refuses_a_request_count(tmp_path, loopback, capsys):
    assert run_multi_turn(tmp_path, loopback.url("ok"), "--num-requests", "5") == 2
    assert "--num-conversations" in capsys.readouterr().err


def test_the_clusters_prefix_cache_finds_the_resent_conversation(tmp_path, inprocess_cluster):
    out = tmp_path / "run"
    assert run_multi_turn(out, inprocess_cluster.url, "--load", "poisson:20") == 0
    inprocess_cluster.wait_all_blocks_free()
    records = read_records(out / "chat" / "requests.jsonl")
    assert len(records) == 9 and all(r.is_ok for r in records)
    for turns in by_conversation(records).values():
        assert turns[0].prompt_tokens < turns[1].prompt_tokens < turns[2].prompt_tokens
        for before, after in zip(turns, turns[1:]):
            # the previous prompt is a prefix of this one: every full 16-token block is found
            assert after.cached_tokens >= before.prompt_tokens // 16 * 16
    summary = json.loads((out / "chat" / "run.json").read_text())["summary"]
    assert summary["turns"]["3"]["prefix_reuse"] > 0.5 and summary["prefix_reuse"] > 0.3
