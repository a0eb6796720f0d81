"""`disagg-bench run`, `report` and `compare` end to end against the loopback SSE server."""

from __future__ import annotations

import json

import pytest

from bench.cli import main
from bench.serving.metrics import request_metrics
from bench.serving.record import read_records
from tests.bench.conftest import FIRST_TOKEN_DELAY_S

SUMMARY_KEYS = {
    "num_requests",
    "num_ok",
    "errors",
    "duration_s",
    "offered_rate_rps",
    "send_rate_rps",
    "request_throughput_rps",
    "input_tokens_per_s",
    "output_tokens_per_s",
    "goodput_rps",
    "goodput_tokens_per_s",
    "slo_attainment",
    "ttft_ms",
    "ttft_sched_ms",
    "tpot_ms",
    "itl_ms",
    "first_decode_gap_ms",
    "max_stall_ms",
    "e2e_ms",
    "dispatch_lag_ms",
}


def run(tmp_path, loopback, load: str, *extra: str) -> int:
    return main([
        "run", "--target", f"plain={loopback.url('ok')}", "--target", f"chunky={loopback.url('chunk3')}",
        "--input-len", "uniform:8:40", "--output-len", "fixed:10", "--load", load,
        "--num-requests", "24", "--warmup", "2", "--seed", "5",
        "--slo", "ttft<=5s,tpot<=100ms", "-o", str(tmp_path), *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def open_loop_run(tmp_path_factory, loopback):
    out = tmp_path_factory.mktemp("open")
    assert run(out, loopback, "poisson:40") == 0
    return out


def test_files_and_fields(open_loop_run):
    assert len((open_loop_run / "workload.jsonl").read_text().splitlines()) == 26
    for name in ("plain", "chunky"):
        run_json = json.loads((open_loop_run / name / "run.json").read_text())
        assert run_json["summary"].keys() >= SUMMARY_KEYS
        assert run_json["environment"]["git_sha"]
        assert run_json["config"]["load"] == "poisson:40"
        assert run_json["target"]["name"] == name
        assert isinstance(run_json["warnings"], list)
        records = read_records(open_loop_run / name / "requests.jsonl")
        assert len(records) == 26 and sum(r.is_warmup for r in records) == 2


def test_numbers_are_consistent(open_loop_run):
    for name in ("plain", "chunky"):
        summary = json.loads((open_loop_run / name / "run.json").read_text())["summary"]
        records = read_records(open_loop_run / name / "requests.jsonl")
        assert summary["num_ok"] == 24 and summary["num_errors"] == 0
        assert summary["slo_attainment"] == 1.0
        assert summary["prompt_token_mismatches"] == 0  # exact-length prompts
        assert summary["output_token_mismatches"] == 0
        assert summary["ttft_ms"]["p50"] >= FIRST_TOKEN_DELAY_S * 1000
        assert summary["ttft_sched_ms"]["p50"] >= summary["ttft_ms"]["p50"]
        assert summary["output_tokens_per_s"] == pytest.approx(
            24 * 10 / summary["duration_s"], rel=1e-6
        )
        for r in records:
            assert r.scheduled_ns <= r.slot_ns <= r.sent_ns < r.chunk_ns[0] <= r.end_ns
            assert r.prompt_tokens == r.input_len and r.completion_tokens == 10
            m = request_metrics(r)
            assert m.e2e_ms >= m.ttft_ms >= FIRST_TOKEN_DELAY_S * 1000


def test_targets_got_the_identical_workload_and_schedule(open_loop_run):
    plain = read_records(open_loop_run / "plain" / "requests.jsonl")
    chunky = read_records(open_loop_run / "chunky" / "requests.jsonl")
    assert [r.scheduled_ns for r in plain] == [r.scheduled_ns for r in chunky]
    assert [r.input_len for r in plain] == [r.input_len for r in chunky]


def test_report_and_compare_recompute_from_requests(open_loop_run, tmp_path, capsys):
    assert main(["report", str(open_loop_run)]) == 0
    table = capsys.readouterr().out
    assert "TTFT sched p99 (ms)" in table and "chunky/plain" in table
    (open_loop_run / "plain" / "run.json").rename(tmp_path / "moved.json")
    try:
        assert main(["compare", str(open_loop_run / "plain"), str(open_loop_run / "chunky")]) == 0
        assert "SLO attainment" in capsys.readouterr().out
    finally:
        (tmp_path / "moved.json").rename(open_loop_run / "plain" / "run.json")


def test_closed_loop_with_an_inflight_cap(tmp_path, loopback):
    assert run(tmp_path, loopback, "closed:4", "--max-inflight", "2") == 0
    records = read_records(tmp_path / "plain" / "requests.jsonl")
    events = sorted([(r.sent_ns, 1) for r in records] + [(r.end_ns, -1) for r in records])
    inflight = max_inflight = 0
    for _, delta in events:
        inflight += delta
        max_inflight = max(max_inflight, inflight)
    assert max_inflight <= 2
    summary = json.loads((tmp_path / "plain" / "run.json").read_text())["summary"]
    assert summary["offered_rate_rps"] is not None and summary["num_ok"] == 24


def test_bad_specs_fail_before_anything_runs(tmp_path, loopback, capsys):
    assert run(tmp_path, loopback, "poisson:fast") == 2
    assert "bad load" in capsys.readouterr().err
    assert run(tmp_path, loopback, "poisson:1", "--repeats", "0") == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
    assert run(tmp_path, loopback, "poisson:1", "--duration", "0") == 2
    assert "--duration must be > 0" in capsys.readouterr().err
    assert run(tmp_path, loopback, "poisson:1", "--extra-body", "nobody={}") == 2
    assert "not a --target" in capsys.readouterr().err
    assert not (tmp_path / "workload.jsonl").exists()


def test_calibrate_measures_the_client_against_loopback(tmp_path, capsys):
    assert (
        main(
            [
                "calibrate",
                "--num-requests",
                "40",
                "--load",
                "closed:4",
                "--output-len",
                "8",
                "-o",
                str(tmp_path),
            ]
        )
        == 0
    )
    ceiling = json.loads((tmp_path / "calibrate.json").read_text())
    assert ceiling["num_errors"] == 0 and ceiling["requests_per_s"] > 0
    assert ceiling["chunks_per_s"] == pytest.approx(8 * ceiling["requests_per_s"], rel=1e-6)
    assert "client_cpu_percent" in capsys.readouterr().out


def test_progress_line_during_a_run(tmp_path, loopback, capsys):
    assert run(tmp_path, loopback, "constant:20", "--progress") == 0
    assert "sent 26/26" in capsys.readouterr().err


@pytest.mark.slow  # several seconds: the full suite runs it
def test_repeats_pool_passes_and_print_intervals(tmp_path, loopback, capsys):
    assert run(tmp_path, loopback, "constant:40", "--repeats", "2") == 0
    records = read_records(tmp_path / "plain" / "requests.jsonl")
    assert sorted({r.repeat for r in records}) == [0, 1] and len(records) == 2 * 26
    summary = json.loads((tmp_path / "plain" / "run.json").read_text())["summary"]
    assert summary["repeats"] == 2 and summary["num_requests"] == 48
    lo, hi = summary["ci95"]["ttft_ms.p50"]
    assert lo <= summary["ttft_ms"]["p50"] <= hi
    assert lo >= FIRST_TOKEN_DELAY_S * 1000
    assert "[" in next(
        line for line in capsys.readouterr().out.splitlines() if "TTFT sent p50" in line
    )


def run_for(tmp_path, loopback, load: str, duration_s: str, cap: str):
    return main([
        "run", "--target", f"plain={loopback.url('ok')}", "--input-len", "fixed:8",
        "--output-len", "fixed:4", "--load", load, "--duration", duration_s,
        "--num-requests", cap, "-o", str(tmp_path),
    ])  # fmt: skip


def test_duration_cuts_an_open_loop_schedule(tmp_path, loopback):
    assert run_for(tmp_path, loopback, "constant:20", "1", "500") == 0
    records = read_records(tmp_path / "plain" / "requests.jsonl")
    assert len(records) == 20  # sends at 0, 0.05, ... 0.95 s
    assert max(r.scheduled_ns for r in records) < 1e9
    warnings = json.loads((tmp_path / "plain" / "run.json").read_text())["warnings"]
    assert not any("raise --num-requests" in w for w in warnings)  # NOTE: load may warn of lag


@pytest.mark.slow  # several seconds: the full suite runs it
def test_duration_stops_a_closed_loop_and_warns_when_the_cap_runs_out(tmp_path, loopback):
    assert run_for(tmp_path / "stopped", loopback, "closed:2", "0.5", "1000") == 0
    records = read_records(tmp_path / "stopped" / "plain" / "requests.jsonl")
    assert 2 <= len(records) < 1000 and max(r.sent_ns for r in records) < 0.5e9
    assert run_for(tmp_path / "short", loopback, "closed:2", "30", "6") == 0
    run_json = json.loads((tmp_path / "short" / "plain" / "run.json").read_text())
    assert any("raise --num-requests" in w for w in run_json["warnings"])
    assert run_json["summary"]["num_requests"] == 6
