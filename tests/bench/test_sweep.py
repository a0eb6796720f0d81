"""`disagg-bench sweep` and `search` end to end against the loopback SSE server."""

from __future__ import annotations

import json

import pytest

from bench.cli import main
from bench.serving.record import read_records
from tests.bench.test_plots import CURVE_PLOTS, assert_pngs

COMMON = ["--input-len", "fixed:16", "--output-len", "fixed:4", "--seed", "3"]


@pytest.mark.slow  # several seconds: the full suite runs it
def test_sweep_over_rates_runs_every_point_on_one_workload(tmp_path, loopback, capsys):
    targets = ["--target", f"a={loopback.url('ok')}", "--target", f"b={loopback.url('chunk2')}"]
    argv = ["sweep", *targets, *COMMON, "--num-requests", "10", "--rates", "20,40"]
    assert main([*argv, "--slo", "ttft<=5s", "-o", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "poisson:20" in table and "poisson:40" in table and "TTFT p99 ms" in table
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [(p["load"], p["target"]) for p in sweep["points"]] == [
        ("poisson:20", "a"), ("poisson:20", "b"), ("poisson:40", "a"), ("poisson:40", "b")
    ]  # fmt: skip
    assert all(p["summary"]["slo_attainment"] == 1.0 for p in sweep["points"])
    workloads = [(d / "workload.jsonl").read_bytes() for d in sorted(tmp_path.glob("point-*"))]
    assert len(workloads) == 2 and workloads[0] == workloads[1]
    slow = read_records(tmp_path / "point-00-poisson-20" / "a" / "requests.jsonl")
    fast = read_records(tmp_path / "point-01-poisson-40" / "a" / "requests.jsonl")
    assert fast[-1].scheduled_ns < slow[-1].scheduled_ns  # same seed, twice the rate


def test_sweep_over_concurrency(tmp_path, loopback, capsys):
    argv = ["sweep", "--target", f"a={loopback.url('ok')}", *COMMON, "--num-requests", "6"]
    assert main([*argv, "--concurrency", "1,3", "-o", str(tmp_path)]) == 0
    assert "closed:3" in capsys.readouterr().out
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["x"] for p in sweep["points"]] == [1.0, 3.0]


def test_sweep_refuses_bad_points(tmp_path, loopback, capsys):
    argv = ["sweep", "--target", f"a={loopback.url('ok')}", "--rates", "1,-2", "-o", str(tmp_path)]
    assert main(argv) == 2
    assert "positive" in capsys.readouterr().err


@pytest.mark.slow  # several seconds: the full suite runs it
def test_search_finds_the_knee_of_a_server_that_slows_with_load(tmp_path, loopback, capsys):
    """`serial40` serves one prefill at a time for 40 ms (capacity 25 req/s) after which
    TTFT queues; with 20 constant-rate requests, 50 ms base TTFT and ttft<=600ms for 90%,
    D/D/1 queueing puts the knee near 85 req/s (the 18th request waits 18 x (40 ms - 1/rate)).
    The service time is long against a loaded machine's scheduling jitter, so the knee holds."""
    argv = [
        "search", "--target", f"knee={loopback.url('serial40')}", *COMMON,
        "--num-requests", "20", "--load", "constant:1", "--slo", "ttft<=600ms",
        "--attainment", "0.9", "--start-rate", "20", "--max-rate", "800", "--tolerance", "0.2",
        "-o", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    answer = json.loads((tmp_path / "search.json").read_text())["targets"]["knee"]
    print(
        answer["max_rate_rps"], [(p["x"], p["summary"]["slo_attainment"]) for p in answer["probes"]]
    )
    assert 50 <= answer["max_rate_rps"] <= 130, answer["max_rate_rps"]
    assert not answer["is_capped"] and answer["goodput_rps"] > 0
    rates = [p["x"] for p in answer["probes"]]
    assert rates[:2] == [20.0, 40.0]
    failed = [p["x"] for p in answer["probes"] if p["summary"]["slo_attainment"] < 0.9]
    assert failed and min(failed) <= answer["max_rate_rps"] * 1.2 + 1e-9  # the tolerance
    assert "knee:" in capsys.readouterr().out
    assert_pngs(tmp_path, CURVE_PLOTS)
    (tmp_path / "attainment_vs_rate.png").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert_pngs(tmp_path, CURVE_PLOTS)
