"""The /metrics diff: what is kept, what moved, and how it lines up with the client's counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bench.serving.record import RequestRecord
from bench.serving.server_metrics import agreement, diff, parse_samples


def exposition(requests: int, tokens: int, ttft_s: list[float], running: int) -> str:
    registry = CollectorRegistry()
    counter = Counter("disagg_requests", "", ["status"], registry=registry)
    counter.labels(status="finished").inc(requests)
    Counter("disagg_generation_tokens", "", registry=registry).inc(tokens)
    ttft = Histogram("disagg_time_to_first_token_seconds", "", registry=registry)
    for value in ttft_s:
        ttft.observe(value)
    Gauge("disagg_requests_running", "", registry=registry).set(running)
    return generate_latest(registry).decode()


def test_only_monotonic_samples_are_kept():
    samples = parse_samples(exposition(3, 30, [0.5], running=2))
    assert samples['disagg_requests_total{status="finished"}'] == 3
    assert samples["disagg_time_to_first_token_seconds_count"] == 1
    assert not any("running" in k or "_bucket" in k or "_created" in k for k in samples)


def test_diff_keeps_what_moved_and_agreement_compares_with_the_client():
    before = parse_samples(exposition(3, 30, [0.5], running=2))
    after = parse_samples(exposition(5, 52, [0.5, 0.25, 0.25], running=0))
    deltas = diff(before, after)
    assert deltas == {
        'disagg_requests_total{status="finished"}': 2,
        "disagg_generation_tokens_total": 22,
        "disagg_time_to_first_token_seconds_count": 2,
        "disagg_time_to_first_token_seconds_sum": 0.5,
    }
    ok = RequestRecord(0, 4, 11, completion_tokens=11, prompt_tokens=4)
    failed = RequestRecord(1, 4, 11, error="5xx")
    pairs = agreement(deltas, [ok, ok, failed])
    assert pairs["requests_finished"] == {"server": 2, "client": 2}
    assert pairs["generation_tokens"] == {"server": 22, "client": 22}
    assert pairs["prompt_tokens"] == {"server": 0, "client": 8}


def test_a_server_without_disagg_series_has_nothing_to_agree_on():
    assert agreement({"http_requests_total": 4.0}, [RequestRecord(0, 1, 1)]) == {}
