from __future__ import annotations

import pytest

from bench.serving.metrics import request_metrics
from bench.serving.record import RequestRecord
from bench.serving.slo import parse_slo


def test_parse_units_and_operators():
    slo = parse_slo("ttft<=2s, tpot<200ms,e2e<=1500000us")
    assert [(b.metric, b.limit_ms, b.is_strict) for b in slo.bounds] == [
        ("ttft", 2000.0, False),
        ("tpot", 200.0, True),
        ("e2e", 1500.0, False),
    ]


@pytest.mark.parametrize("text", ["ttft<=2", "latency<=2s", "ttft>=2s", "ttft<=fast"])
def test_bad_bounds_name_the_problem(text):
    with pytest.raises(ValueError, match="bad SLO bound"):
        parse_slo(text)


def test_ttft_is_from_the_scheduled_send():
    late = RequestRecord(
        0,
        1,
        1,
        scheduled_ns=0,
        sent_ns=500_000_000,
        chunk_ns=[600_000_000],
        chunk_tokens=[1],
        end_ns=600_000_000,
    )
    metrics = request_metrics(late)
    assert parse_slo("ttft_sent<=200ms").is_met(metrics)
    assert not parse_slo("ttft<=200ms").is_met(metrics)
    assert parse_slo("tpot<=1ms").is_met(metrics)  # no TPOT, nothing to violate
