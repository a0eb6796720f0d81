"""Every metric definition on hand-built timestamp sequences (all times in ms)."""

from __future__ import annotations

import pytest

from bench.serving.metrics import request_metrics, summarize_run, ttft_phases_ms
from bench.serving.record import RequestRecord
from bench.serving.slo import parse_slo
from bench.serving.stats import summarize

MS = 1_000_000


def record(
    chunks: list[tuple[float, int]],
    *,
    scheduled: float = 0,
    sent: float = 0,
    slot: float | None = None,
    end: float | None = None,
    completion: int | None = None,
    streamed: bool = False,
    error: str | None = None,
    warmup: bool = False,
    index: int = 0,
    input_len: int = 10,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        input_len=input_len,
        output_len=sum(n for _, n in chunks),
        is_warmup=warmup,
        scheduled_ns=int(scheduled * MS),
        slot_ns=int((scheduled if slot is None else slot) * MS),
        sent_ns=int(sent * MS),
        chunk_ns=[int(t * MS) for t, _ in chunks],
        chunk_tokens=[n for _, n in chunks],
        end_ns=int((end if end is not None else (chunks[-1][0] if chunks else sent)) * MS),
        error=error,
        prompt_tokens=input_len,
        completion_tokens=completion if completion is not None else sum(n for _, n in chunks),
        is_usage_streamed=streamed,
    )


def weighted_mean(m) -> float:
    return sum(v * w for v, w in zip(m.itl_ms, m.itl_weights)) / sum(m.itl_weights)


def test_single_token_chunks():
    m = request_metrics(record([(100, 1), (110, 1), (130, 1), (160, 1)], sent=10, end=170))
    assert m.ttft_ms == pytest.approx(90)
    assert m.ttft_sched_ms == pytest.approx(100)
    assert m.tpot_ms == pytest.approx(20)
    assert m.first_decode_gap_ms == pytest.approx(10)
    assert m.max_stall_ms == pytest.approx(30)
    assert m.e2e_ms == pytest.approx(160)
    assert [v for v, w in zip(m.itl_ms, m.itl_weights) if w] == pytest.approx([10, 20, 30])
    assert weighted_mean(m) == pytest.approx(m.tpot_ms)


def test_multi_token_chunk_counts_n_gaps_of_g_over_n():
    m = request_metrics(record([(100, 1), (140, 4), (150, 1)], streamed=True))
    pairs = [(v, w) for v, w in zip(m.itl_ms, m.itl_weights) if w]
    assert pairs == [(pytest.approx(10), 4), (pytest.approx(10), 1)]
    assert m.tpot_ms == pytest.approx(10)
    assert m.first_decode_gap_ms == pytest.approx(40)
    assert m.max_stall_ms == pytest.approx(40)  # stalls are per chunk, not per token
    assert summarize(list(m.itl_ms), list(m.itl_weights))["p99"] == pytest.approx(10)


def test_extra_tokens_of_first_chunk_are_zero_gaps():
    m = request_metrics(record([(100, 3), (130, 1)]))
    assert list(zip(m.itl_ms, m.itl_weights)) == [(0.0, 2.0), (pytest.approx(30), 1.0)]
    assert m.tpot_ms == pytest.approx(10)
    assert weighted_mean(m) == pytest.approx(m.tpot_ms)


def test_counted_chunks_are_rescaled_to_final_usage():
    m = request_metrics(record([(0, 1), (20, 1), (40, 1)], completion=6))
    assert m.output_tokens == 6
    assert m.itl_weights == (1.0, 2.0, 2.0)
    assert m.itl_ms == (0.0, pytest.approx(10), pytest.approx(10))
    assert m.tpot_ms == pytest.approx(8)
    assert weighted_mean(m) == pytest.approx(m.tpot_ms)


def test_streamed_usage_is_never_rescaled():
    m = request_metrics(record([(0, 2), (20, 3)], completion=5, streamed=True))
    assert m.itl_weights == (1.0, 3.0)


def test_one_token_has_no_tpot_gap_or_stall():
    m = request_metrics(record([(50, 1)]))
    assert m.ttft_ms == pytest.approx(50)
    assert m.tpot_ms is m.first_decode_gap_ms is m.max_stall_ms is None


def test_dispatch_lag_is_measured_from_when_the_request_could_go():
    assert request_metrics(record([(50, 1)], scheduled=10, sent=13)).dispatch_lag_ms == 3
    held = record([(90, 1)], scheduled=10, slot=60, sent=61)
    assert request_metrics(held).dispatch_lag_ms == pytest.approx(1)
    assert request_metrics(held).ttft_sched_ms == pytest.approx(80)  # the wait still counts


def test_summary_percentiles_are_observed_values():
    s = summarize([4, 1, 3, 2])
    assert (s["mean"], s["p50"], s["p90"], s["p99"], s["max"], s["count"]) == (2.5, 2, 4, 4, 4, 4)
    weighted = summarize([1, 10], [9, 1])
    assert (weighted["p50"], weighted["p90"], weighted["p99"]) == (1, 1, 10)
    assert summarize([])["p50"] is None


def test_throughput_and_rates():
    records = [
        record([(100, 1), (200, 9)], scheduled=0, sent=0, end=500, index=0, input_len=8),
        record([(1100, 5), (1900, 5)], scheduled=1000, sent=1000, end=2000, index=1, input_len=12),
    ]
    s = summarize_run(records, parse_slo(None))
    assert s["duration_s"] == pytest.approx(2.0)
    assert s["offered_rate_rps"] == pytest.approx(1.0)
    assert s["request_throughput_rps"] == pytest.approx(1.0)
    assert s["output_tokens_per_s"] == pytest.approx(10.0)
    assert s["input_tokens_per_s"] == pytest.approx(10.0)
    assert s["itl_ms"]["count"] == 2 + 1  # only positive-weight samples; the first has weight 4


def test_goodput_and_errors_are_slo_misses():
    records = [
        record([(100, 1), (110, 1)], index=0),  # meets ttft<=200ms, tpot<=50ms
        record([(300, 1), (310, 1)], index=1),  # ttft too slow
        record([(50, 1), (150, 1)], index=2),  # tpot too slow
        record([], error="5xx", index=3),
        record([(10, 1)], error="bad_stream", index=4),
    ]
    s = summarize_run(records, parse_slo("ttft<=200ms,tpot<=50ms"))
    assert s["num_ok"] == 3 and s["num_errors"] == 2
    assert s["errors"] == {
        "4xx": 0,
        "5xx": 1,
        "timeout": 0,
        "connection": 0,
        "bad_stream": 1,
        "empty": 0,
    }
    assert s["slo_attainment"] == pytest.approx(1 / 5)
    assert s["goodput_rps"] * s["duration_s"] == pytest.approx(1)
    assert s["goodput_tokens_per_s"] * s["duration_s"] == pytest.approx(2)
    assert s["ttft_ms"]["count"] == 3  # latencies only over successful requests
    assert s["request_throughput_rps"] * s["duration_s"] == pytest.approx(3)


def test_warmup_is_excluded_from_every_metric():
    records = [
        record([(5000, 1), (9000, 1)], warmup=True, index=0, end=9000),
        record([(100, 1), (120, 1)], scheduled=50, sent=50, index=1, end=120),
    ]
    s = summarize_run(records, parse_slo(None))
    assert (s["num_requests"], s["num_warmup"]) == (1, 1)
    assert s["ttft_ms"]["max"] == pytest.approx(50)
    assert s["max_stall_ms"]["max"] == pytest.approx(20)
    assert s["duration_s"] == pytest.approx(0.07)


def test_token_checks_flag_drift():
    drifted = record([(10, 1), (20, 1)], input_len=10)
    drifted.prompt_tokens = 11
    drifted.output_len = 5
    s = summarize_run([drifted], parse_slo(None))
    assert s["prompt_token_mismatches"] == 1
    assert s["output_token_mismatches"] == 1


def test_ttft_phases_add_up_to_the_clients_ttft():
    served = record([(120, 1), (150, 1)], sent=0)
    served.server_timings = {
        "ttft_s": 0.100,
        "queue_s": 0.010,
        "prefill_s": 0.060,
        "kv_transfer_s": 0.005,
        "first_decode_gap_s": 0.025,
    }
    phases = ttft_phases_ms(served)
    assert phases == pytest.approx({
        "queue_ms": 10, "prefill_ms": 60, "kv_transfer_ms": 5, "server_other_ms": 25,
        "network_ms": 20, "server_ttft_ms": 100, "server_first_decode_gap_ms": 25,
    })  # fmt: skip
    parts = ("queue_ms", "prefill_ms", "kv_transfer_ms", "server_other_ms", "network_ms")
    assert sum(phases[p] for p in parts) == pytest.approx(request_metrics(served).ttft_ms)


def test_ttft_breakdown_needs_server_timings_and_success():
    plain = record([(50, 1)])
    failed = record([(50, 1)], error="bad_stream")
    failed.server_timings = {"ttft_s": 0.01}
    assert summarize_run([plain, failed], parse_slo(None))["ttft_breakdown_ms"] is None
    plain.server_timings = {"ttft_s": 0.04, "prefill_s": 0.03}
    breakdown = summarize_run([plain, failed], parse_slo(None))["ttft_breakdown_ms"]
    assert breakdown["prefill_ms"]["count"] == 1
    assert breakdown["network_ms"]["mean"] == pytest.approx(10)
    assert "server_first_decode_gap_ms" not in breakdown


def test_repeats_pool_their_passes_each_on_its_own_clock():
    passes = []
    for repeat in range(2):  # each pass: 2 requests over 1 s, 10 tokens each
        for index, start in enumerate((0, 500)):
            r = record(
                [(start + 100, 1), (start + 500, 9)], scheduled=start, sent=start, index=index
            )
            r.repeat = repeat
            passes.append(r)
    s = summarize_run(passes, parse_slo(None))
    assert s["repeats"] == 2 and s["num_requests"] == 4
    assert s["duration_s"] == pytest.approx(2.0)  # not the 1 s the overlapping clocks span
    assert s["output_tokens_per_s"] == pytest.approx(20.0)
    assert s["offered_rate_rps"] == pytest.approx(2.0)
    assert s["ci95"]["output_tokens_per_s"] == pytest.approx([20.0, 20.0])  # identical passes
    assert s["ci95"]["ttft_ms.p50"] == pytest.approx([100, 100])
    assert summarize_run(passes[:2], parse_slo(None))["ci95"] is None
