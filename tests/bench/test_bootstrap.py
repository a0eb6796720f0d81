"""Bootstrap intervals: they cover the truth, widen with noise between passes, and repeat."""

from __future__ import annotations

import numpy as np
import pytest

from bench.serving.bootstrap import confidence_intervals
from bench.serving.metrics import RequestMetrics
from bench.serving.slo import parse_slo


def request(ttft_ms: float, tokens: int = 10, is_ok: bool = True) -> RequestMetrics:
    return RequestMetrics(
        index=0, is_ok=is_ok, error=None if is_ok else "5xx", input_tokens=8,
        output_tokens=tokens, ttft_ms=ttft_ms, ttft_sched_ms=ttft_ms, tpot_ms=5.0,
        first_decode_gap_ms=5.0, max_stall_ms=5.0, e2e_ms=ttft_ms + 45, dispatch_lag_ms=0.1,
        itl_ms=(0.0, 5.0), itl_weights=(0.0, tokens - 1),
    )  # fmt: skip


def passes_around(centres: list[float], n: int = 200, seed: int = 1) -> list[list[RequestMetrics]]:
    rng = np.random.default_rng(seed)
    return [[request(float(t)) for t in rng.normal(c, 10, size=n)] for c in centres]


@pytest.mark.slow  # several seconds: the full suite runs it
def test_interval_covers_the_mean_and_narrows_with_agreeing_passes():
    slo = parse_slo("ttft<=1s")
    agree = confidence_intervals(passes_around([100, 100, 100]), [10, 10, 10], slo)
    differ = confidence_intervals(passes_around([80, 100, 120]), [10, 10, 10], slo)
    lo, hi = agree["ttft_ms.mean"]
    assert lo < 100 < hi and hi - lo < 3
    assert differ["ttft_ms.mean"][1] - differ["ttft_ms.mean"][0] > 5 * (hi - lo)
    assert agree["output_tokens_per_s"] == pytest.approx([200.0, 200.0])  # 600 req x 10 / 30 s
    assert agree["itl_ms.p50"] == pytest.approx([5.0, 5.0])


def test_failures_count_against_throughput_and_attainment_only():
    passes = [[request(50.0), request(50.0, is_ok=False)] for _ in range(2)]
    ci = confidence_intervals(passes, [1.0, 1.0], parse_slo(None), iterations=200)
    assert 0 <= ci["slo_attainment"][0] <= ci["slo_attainment"][1] <= 1
    assert ci["ttft_ms.p99"] == pytest.approx([50.0, 50.0])  # latencies of successes only


def test_same_seed_same_intervals():
    passes, slo = passes_around([90, 110]), parse_slo(None)
    assert confidence_intervals(passes, [5, 5], slo) == confidence_intervals(passes, [5, 5], slo)
