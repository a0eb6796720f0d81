"""ShareGPT files, shared-prefix groups and traces: small files in tmp_path, seeded."""

from __future__ import annotations

import json

import pytest

from bench.cli import main
from bench.serving.datasets import (
    LengthFilter,
    SharedPrefixConfig,
    build_shared_prefix,
    load_sharegpt,
)
from bench.serving.lengths import parse_length
from bench.serving.record import read_records
from bench.serving.workload import count_tokens, write_workload


def sharegpt_file(tmp_path, num: int = 12):
    conversations = [
        {"id": "no-reply", "conversations": [{"from": "human", "value": "hello there"}]},
        {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "hi"}]},
    ]
    for i in range(num):
        reply = " ".join(["word"] * (3 + 4 * i))
        turns = [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": f"question number {i} " + "about rivers " * i},
            {"from": "gpt", "value": reply},
            {"from": "human", "value": "and the second turn is ignored"},
        ]
        conversations.append({"id": str(i), "conversations": turns})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    return path


def test_sharegpt_takes_first_human_turn_and_reply_length(tmp_path, tokenizer):
    path = sharegpt_file(tmp_path)
    workload = load_sharegpt(path, tokenizer, 12, seed=0, lengths=LengthFilter())
    assert sorted(r.prompt.split()[2] for r in workload) == sorted(str(i) for i in range(12))
    for r in workload:
        i = int(r.prompt.split()[2])
        reply = " ".join(["word"] * (3 + 4 * i))
        assert r.output_len == len(tokenizer.encode(reply, add_special_tokens=False))
        assert r.input_len == count_tokens(tokenizer, r.prompt)
    assert [r.index for r in workload] == list(range(12))


def test_sharegpt_filters_and_seeds(tmp_path, tokenizer):
    path = sharegpt_file(tmp_path)
    lengths = LengthFilter(max_output=20)
    workload = load_sharegpt(path, tokenizer, 4, seed=1, lengths=lengths)
    assert all(r.output_len <= 20 for r in workload)
    files = [tmp_path / f"{name}.jsonl" for name in "abc"]
    for file, seed in zip(files, (1, 1, 2)):
        write_workload(file, load_sharegpt(path, tokenizer, 4, seed=seed, lengths=lengths))
    assert files[0].read_bytes() == files[1].read_bytes() != files[2].read_bytes()
    with pytest.raises(ValueError, match="pass the length filters"):
        load_sharegpt(path, tokenizer, 11, seed=0, lengths=lengths)


def test_shared_prefix_groups(tokenizer):
    config = SharedPrefixConfig(3, 4, 40, parse_length("uniform:5:15"), parse_length("fixed:7"))
    workload = build_shared_prefix(config, tokenizer, 15, seed=2)
    assert len(workload) == 15 and len({r.prompt for r in workload}) == 12  # cycles after G x P
    prefixes = {" ".join(r.prompt.split()[:20]) for r in workload}
    assert len(prefixes) == 3
    for r in workload:
        assert r.input_len == count_tokens(tokenizer, r.prompt)
        assert 40 + 5 <= r.input_len <= 40 + 15 + 2 and r.output_len == 7
    again = build_shared_prefix(config, tokenizer, 15, seed=2)
    assert again == workload and build_shared_prefix(config, tokenizer, 15, seed=3) != workload


def test_trace_replayed_with_a_time_scale(tmp_path, loopback):
    entries = [{"t": 10.0 + 0.1 * i, "input_len": 8 + i, "output_len": 2 + i % 3} for i in range(6)]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    out = tmp_path / "out"
    argv = ["run", "--target", f"a={loopback.url('ok')}", "--workload", "trace"]
    argv += ["--dataset", str(trace), "--time-scale", "0.5", "--num-requests", "6", "-o", str(out)]
    assert main(argv) == 0
    records = read_records(out / "a" / "requests.jsonl")
    assert [r.scheduled_ns / 1e9 for r in records] == pytest.approx([0.05 * i for i in range(6)])
    assert [(r.input_len, r.output_len) for r in records] == [
        (e["input_len"], e["output_len"]) for e in entries
    ]
    summary = json.loads((out / "a" / "run.json").read_text())["summary"]
    assert summary["num_ok"] == 6 and summary["prompt_token_mismatches"] == 0


def test_dataset_workloads_need_a_file(tmp_path, loopback, capsys):
    argv = ["run", "--target", f"a={loopback.url('ok')}", "--workload", "sharegpt"]
    assert main([*argv, "-o", str(tmp_path)]) == 2
    assert "--dataset" in capsys.readouterr().err
