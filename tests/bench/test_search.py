"""The goodput search on synthetic pass/fail curves: no server, microseconds each."""

from __future__ import annotations

import numpy as np
import pytest

from bench.serving.search import SearchConfig, find_max_rate


def knee_curve(knee: float):
    """Attainment 1 up to the knee, then falling off quickly."""
    return lambda rate: 1.0 if rate <= knee else max(0.0, 1.0 - 4 * (rate / knee - 1))


def noisy_curve(knee: float, seed: int):
    """The knee curve plus seeded Gaussian noise of 0.03, clipped to [0, 1]."""
    rng, curve = np.random.default_rng(seed), knee_curve(knee)
    return lambda rate: float(np.clip(curve(rate) + rng.normal(0, 0.03), 0, 1))


@pytest.mark.parametrize("knee", [0.3, 1.0, 3.7, 13.0, 100.0, 700.0])
def test_monotone_curve_finds_the_knee_within_tolerance(knee):
    config = SearchConfig(attainment=0.9, start_rate=1.0, max_rate=1024.0)
    result = find_max_rate(knee_curve(knee), config)
    threshold = knee * 1.025  # where the curve crosses 0.9
    assert threshold * 0.95 <= result.max_rate <= threshold + 1e-9
    assert not result.is_capped
    assert len(result.probes) <= 20
    failing = [r for r, a in result.probes if a < 0.9]
    assert min(failing) <= result.max_rate * 1.05 + 1e-9  # bracketed to 5%


def test_grows_by_doubling_first():
    result = find_max_rate(knee_curve(10.0), SearchConfig(start_rate=1.0))
    assert [r for r, _ in result.probes[:5]] == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_noisy_curve_stays_near_the_knee():
    for seed in range(20):
        result = find_max_rate(
            noisy_curve(50.0, seed), SearchConfig(attainment=0.9, start_rate=3.0)
        )
        assert 50.0 * 0.9 <= result.max_rate <= 50.0 * 1.1


def test_ceiling_passes_so_the_answer_is_capped():
    result = find_max_rate(lambda rate: 1.0, SearchConfig(start_rate=1.0, max_rate=10.0))
    assert result.max_rate == 10.0 and result.is_capped
    assert [r for r, _ in result.probes] == [1.0, 2.0, 4.0, 8.0, 10.0]


def test_failing_start_halves_down():
    result = find_max_rate(knee_curve(3.0), SearchConfig(start_rate=64.0))
    assert 3.0 * 0.95 <= result.max_rate <= 3.0 * 1.1
    assert [r for r, _ in result.probes[:4]] == [64.0, 32.0, 16.0, 8.0]


def test_nothing_passes():
    result = find_max_rate(lambda rate: 0.0, SearchConfig(start_rate=1.0))
    assert result.max_rate is None and len(result.probes) == 11


@pytest.mark.parametrize(
    "kwargs", [{"attainment": 0.0}, {"attainment": 1.5}, {"start_rate": 0}, {"tolerance": 0}]
)
def test_bad_configs_are_refused(kwargs):
    with pytest.raises(ValueError):
        SearchConfig(**kwargs)
