from __future__ import annotations

import numpy as np
import pytest

from bench.serving.schedule import LoadSpec, build_schedule, parse_load

N = 20_000


def gaps(text: str, seed: int = 0) -> np.ndarray:
    return np.diff(build_schedule(parse_load(text), N, seed).offsets_s)


@pytest.mark.parametrize("text", ["poisson:5", "poisson:5,burst=0.25", "poisson:5,burst=4"])
def test_mean_rate_within_tolerance(text):
    assert 1 / gaps(text).mean() == pytest.approx(5, rel=0.05)


@pytest.mark.parametrize(("burst", "cv"), [(0.25, 2.0), (1.0, 1.0), (4.0, 0.5)])
def test_burstiness_sets_the_coefficient_of_variation(burst, cv):
    g = gaps(f"poisson:10,burst={burst}")
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.08)


def test_constant_is_exact_and_starts_at_zero():
    offsets = build_schedule(parse_load("constant:4"), 5, 0).offsets_s
    assert offsets == pytest.approx((0, 0.25, 0.5, 0.75, 1.0))


def test_same_seed_same_schedule_other_seed_differs():
    assert (gaps("poisson:3", seed=7) == gaps("poisson:3", seed=7)).all()
    assert not (gaps("poisson:3", seed=7) == gaps("poisson:3", seed=8)).all()


def test_closed_loop_has_users_not_times():
    schedule = build_schedule(parse_load("closed:8"), 10, 0, max_inflight=4)
    assert (schedule.offsets_s, schedule.concurrency, schedule.max_inflight) == (None, 8, 4)


def test_parse_and_describe_round_trip():
    for text in ("poisson:2.5", "poisson:2,burst=0.5", "constant:3", "closed:16"):
        assert parse_load(text).describe() == text
    assert parse_load("poisson:2") == LoadSpec("poisson", 2.0)


@pytest.mark.parametrize(
    "text", ["poisson", "gamma:2", "closed:0", "constant:2,burst=3", "poisson:-1"]
)
def test_bad_loads_are_refused(text):
    with pytest.raises(ValueError):
        parse_load(text)
