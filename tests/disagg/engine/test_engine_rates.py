"""Prefill rate and decode step time as a worker reports them: moving averages over the
engine's counters, 0.0 until measured."""

from __future__ import annotations

import pytest

from disagg.engine.engine_rates import EngineRates, ewma
from disagg.engine.llm_engine import EngineStats


def test_nothing_measured_reads_zero():
    rates = EngineRates(EngineStats())
    assert rates.sample().prefill_tokens_per_s == 0.0
    assert rates.sample().decode_step_s == 0.0


def test_work_before_the_meter_started_is_not_counted():
    stats = EngineStats(prefill_s=100.0, num_prefill_tokens=1)
    rates = EngineRates(stats)
    stats.prefill_s += 0.5
    stats.num_prefill_tokens += 500
    assert rates.sample().prefill_tokens_per_s == pytest.approx(1000.0)


def test_rates_average_over_samples_and_hold_while_idle():
    stats = EngineStats()
    rates = EngineRates(stats)
    stats.prefill_s, stats.num_prefill_tokens = 1.0, 1000
    stats.decode_s, stats.num_decode_steps = 0.2, 10
    first = rates.sample()
    assert first.prefill_tokens_per_s == pytest.approx(1000.0)
    assert first.decode_step_s == pytest.approx(0.02)
    stats.prefill_s, stats.num_prefill_tokens = 2.0, 3000  # 2000 tok/s since
    second = rates.sample()
    assert second.prefill_tokens_per_s == pytest.approx(ewma(1000.0, 2000.0))
    assert 1000.0 < second.prefill_tokens_per_s < 2000.0
    assert second.decode_step_s == pytest.approx(0.02)  # no decode since: unchanged
    assert rates.sample() == second
