"""`disagg-bench run` against a real `disagg serve`: its numbers agree with the server's own."""

from __future__ import annotations

import json

import pytest

from bench.cli import main
from bench.serving.metrics import ttft_phases_ms
from bench.serving.record import read_records
from bench.serving.server_metrics import series_total
from tests.cluster_harness import ServeProcess

pytestmark = pytest.mark.slow  # starts real `disagg serve` processes on the default model

NUM_REQUESTS, NUM_WARMUP, OUTPUT_LEN = 10, 2, 6


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster-run")
    with ServeProcess("--prefill-workers", "1", "--decode-workers", "1") as cluster:
        code = main([
            "run", "--target", f"ours={cluster.url}", "--input-len", "uniform:16:64",
            "--output-len", f"fixed:{OUTPUT_LEN}", "--load", "poisson:4", "--seed", "3",
            "--num-requests", str(NUM_REQUESTS), "--warmup", str(NUM_WARMUP),
            "--slo", "ttft<=30s,tpot<=5s", "-o", str(out),
        ])  # fmt: skip
        cluster.wait_all_blocks_free()
    assert code == 0
    return json.loads((out / "ours" / "run.json").read_text()), out / "ours" / "requests.jsonl"


def test_every_request_succeeds_with_exact_token_counts(bench_run):
    run_json, _ = bench_run
    summary = run_json["summary"]
    assert summary["num_ok"] == NUM_REQUESTS and summary["slo_attainment"] == 1.0
    assert summary["prompt_token_mismatches"] == 0 and summary["output_token_mismatches"] == 0
    assert summary["output_tokens_per_s"] > 0 and summary["ttft_ms"]["p50"] > 0
    assert run_json["environment"]["git_sha"] and run_json["config"]["load"] == "poisson:4"


def test_counts_agree_with_the_servers_metrics(bench_run):
    run_json, _ = bench_run
    pairs = run_json["server_agreement"]
    assert pairs["requests_finished"]["server"] == NUM_REQUESTS + NUM_WARMUP  # warm-up is served
    assert pairs["generation_tokens"]["server"] == (NUM_REQUESTS + NUM_WARMUP) * OUTPUT_LEN
    for pair in pairs.values():
        assert pair["server"] == pair["client"]
    deltas = run_json["server_metrics_diff"]
    ttft_count = series_total(deltas, "disagg_time_to_first_token_seconds_count")
    assert ttft_count == NUM_REQUESTS + NUM_WARMUP
    assert series_total(deltas, "disagg_kv_transfer_bytes_total") > 0
    assert not any("mismatch" in w or "server counted" in w for w in run_json["warnings"])


def test_ttft_is_split_into_the_servers_phases(bench_run):
    run_json, requests_path = bench_run
    breakdown = run_json["summary"]["ttft_breakdown_ms"]
    assert breakdown["prefill_ms"]["count"] == NUM_REQUESTS
    assert breakdown["prefill_ms"]["mean"] > 0 and breakdown["kv_transfer_ms"]["mean"] >= 0
    assert (
        breakdown["network_ms"]["p50"] >= 0 and breakdown["server_first_decode_gap_ms"]["p50"] > 0
    )
    client_ttft_ms = run_json["summary"]["ttft_ms"]["mean"]
    phases = ("queue_ms", "prefill_ms", "kv_transfer_ms", "server_other_ms", "network_ms")
    assert sum(breakdown[p]["mean"] for p in phases) == pytest.approx(client_ttft_ms, rel=1e-6)
    for record in read_records(requests_path):
        assert record.server_timings["decode_worker"] and ttft_phases_ms(record) is not None
