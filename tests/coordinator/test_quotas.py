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
    assert len(quotas._requests.levels) <= 3


def test_no_limits_admit_everything():
    quotas = TenantQuotas()
    leases = [quotas.admit("a") for _ in range(1000)]
    assert len(leases) == 1000


def test_tokens_per_minute_admit_until_in_debt_then_say_when_it_is_repaid():
    clock = Clock()
    quotas = TenantQuotas(max_tpm=60, clock=clock)  # one token per second, 60 at once
    quotas.admit("a").release()
    quotas.charge_tokens("a", 50)
    quotas.admit("a").release()  # 10 left: not in debt
    quotas.charge_tokens("a", 25)  # a request may overdraw: 15 in debt
    with pytest.raises(QuotaExceededError) as refused:
        quotas.admit("a")
    assert refused.value.retry_after_s == 15 and "tokens per minute" in str(refused.value)
    quotas.admit("b").release()  # another tenant has its own bucket
    clock.now_s += 14
    with pytest.raises(QuotaExceededError) as refused:
        quotas.admit("a")
    assert refused.value.retry_after_s == 1
    clock.now_s += 1
    quotas.admit("a").release()
    clock.now_s += 3600
    quotas.charge_tokens("a", 60)  # refills only up to a minute's worth
    assert quotas._tokens.level("a") == 0


def test_a_tenant_over_its_tokens_per_minute_gets_429_while_another_is_served():
    from starlette.testclient import TestClient

    from coordinator.app import build_app
    from tests.coordinator.echo_cluster import MODEL, make_frontend

    clock = Clock()
    quotas = TenantQuotas(max_tpm=60, clock=clock)
    frontend = make_frontend()
    frontend.quotas = frontend.generator.quotas = quotas
    client = TestClient(build_app(frontend))

    def complete(tenant: str):
        body = {"text_input": "x" * 40, "parameters": {"max_tokens": 30, "tenant_id": tenant}}
        return client.post(f"/v2/models/{MODEL}/generate", json=body)

    first = complete("alpha")  # 40 prompt + 30 generated tokens: 10 in debt
    assert first.status_code == 200 and first.json()["token_count"] == 30
    refused = complete("alpha")
    assert refused.status_code == 429 and refused.headers["retry-after"] == "10"
    assert "tokens per minute" in refused.json()["error"]
    assert complete("beta").status_code == 200
    clock.now_s += 10
    assert complete("alpha").status_code == 200
