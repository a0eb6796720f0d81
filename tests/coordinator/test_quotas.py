"""Per-tenant quotas on a fake clock: the token bucket's bursts, sustained rate and
Retry-After, concurrency leases, and forgetting idle tenants."""

from __future__ import annotations

import pytest

from coordinator import quotas as quotas_module
from coordinator.errors import QuotaExceededError, classify
from coordinator.quotas import TenantQuotas


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_rate_allows_a_seconds_burst_then_the_sustained_rate():
    clock = Clock()
    quotas = TenantQuotas(max_rps=2, clock=clock)
    quotas.admit("a").release()
    quotas.admit("a").release()
    with pytest.raises(QuotaExceededError) as refused:
        quotas.admit("a")
    assert refused.value.retry_after_s == 1
    http = classify(refused.value)
    assert http.status == 429 and http.headers == {"Retry-After": "1"}
    quotas.admit("b").release()  # another tenant has its own bucket
    clock.now_s += 0.5  # one token back at 2 per second
    quotas.admit("a").release()


def test_slow_rate_says_how_long_to_wait():
    clock = Clock()
    quotas = TenantQuotas(max_rps=0.1, clock=clock)
    quotas.admit("a").release()
    with pytest.raises(QuotaExceededError) as refused:
        quotas.admit("a")
    assert refused.value.retry_after_s == 10


def test_concurrency_is_held_by_leases_released_once():
    quotas = TenantQuotas(max_concurrent=2)
    first, second = quotas.admit("a"), quotas.admit("a")
    with pytest.raises(QuotaExceededError):
        quotas.admit("a")
    first.release()
    first.release()  # idempotent: frees one slot, not two
    third = quotas.admit("a")
    with pytest.raises(QuotaExceededError):
        quotas.admit("a")
    second.release(), third.release()
    assert quotas._running == {}


def test_refused_requests_take_no_token_and_no_slot():
    clock = Clock()
    quotas = TenantQuotas(max_concurrent=1, max_rps=1, clock=clock)
    held = quotas.admit("a")
    with pytest.raises(QuotaExceededError):
        quotas.admit("a")  # over concurrency: the bucket is untouched
    held.release()
    clock.now_s += 1
    quotas.admit("a").release()


def test_idle_tenants_are_forgotten(monkeypatch):
    monkeypatch.setattr(quotas_module, "MAX_TRACKED_TENANTS", 3)
    clock = Clock()
    quotas = TenantQuotas(max_rps=1, clock=clock)
    for name in "abcd":
        quotas.admit(name).release()
    clock.now_s += 5
    quotas.admit("e").release()
    assert len(quotas._buckets) <= 3


def test_no_limits_admit_everything():
    quotas = TenantQuotas()
    leases = [quotas.admit("a") for _ in range(1000)]
    assert len(leases) == 1000
