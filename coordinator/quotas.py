"""Per-tenant quotas: concurrent API requests, requests per second and tokens per minute,
refused with 429 and Retry-After (`QuotaExceededError`), distinct from overload (503): a tenant
over its quota retries later while other tenants keep being served.

Both rates are token buckets per tenant, the usual shape of API rate limits: bursts up to the
capacity, then the sustained rate. Requests per second: capacity one second's worth (at least
one request), one taken per admitted request. Tokens per minute (prompt plus generated
tokens, as OpenAI counts its TPM limits): capacity one minute's worth. A request's tokens are
not known until it runs, so they are charged as they happen (the prompt when generation
starts, each generated token as it arrives) and a bucket may go into debt: a request is
admitted while its tenant's bucket is not in debt, and Retry-After says when it will be
repaid. So the sustained rate holds, and what one burst can overdraw is bounded by the
tenant's concurrency.

A request takes a `Lease` when admitted and gives it back when its last generation ends; a
refused request takes nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.errors import QuotaExceededError

MAX_TRACKED_TENANTS = 10_000
"""Idle buckets are forgotten past this many tenants, so made-up tenant names cost no memory."""


@dataclass
class Lease:
    """One admitted request's hold on its tenant's concurrency; `release` is idempotent."""

    quotas: TenantQuotas | None
    tenant: str

    def release(self) -> None:
        if self.quotas is not None:
            self.quotas._release(self.tenant)
            self.quotas = None

    # NOTE: a safety net: a streamed response whose body never started (the client left
    # before the first byte) drops its lease unreleased; collecting it gives the slot back.
    __del__ = release


@dataclass
class TenantBuckets:
    """One token bucket per tenant, refilled at `rate_per_s` up to `capacity`."""

    rate_per_s: float
    capacity: float
    clock: Callable[[], float]
    levels: dict[str, tuple[float, float]] = field(default_factory=dict)
    """tenant -> (tokens, when they were counted); below zero is debt."""

    def level(self, tenant: str) -> float:
        tokens, then = self.levels.get(tenant, (self.capacity, self.clock()))
        return min(self.capacity, tokens + (self.clock() - then) * self.rate_per_s)

    def wait_s(self, tenant: str, amount: float) -> float:
        """Seconds until the bucket holds `amount` (0: it does now)."""
        return max(0.0, (amount - self.level(tenant)) / self.rate_per_s)

    def take(self, tenant: str, amount: float) -> None:
        """Take `amount` whatever the level: the bucket may go into debt."""
        now = self.clock()
        self.levels[tenant] = (self.level(tenant) - amount, now)
        if len(self.levels) > MAX_TRACKED_TENANTS:
            self._forget_full()

    def _forget_full(self) -> None:
        for name in list(self.levels):
            if self.level(name) >= self.capacity:
                del self.levels[name]


@dataclass
class TenantQuotas:
    max_concurrent: int = 0
    """Concurrent API requests per tenant; 0 is no limit."""
    max_rps: float = 0.0
    """Sustained requests per second per tenant; 0 is no limit."""
    clock: Callable[[], float] = time.monotonic
    max_tpm: float = 0.0
    """Sustained prompt plus generated tokens per minute per tenant; 0 is no limit."""
    _running: dict[str, int] = field(default_factory=dict)
    _requests: TenantBuckets | None = field(init=False, default=None)
    _tokens: TenantBuckets | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.max_rps:
            self._requests = TenantBuckets(self.max_rps, max(1.0, self.max_rps), self.clock)
        if self.max_tpm:
            self._tokens = TenantBuckets(self.max_tpm / 60, self.max_tpm, self.clock)

    def admit(self, tenant: str) -> Lease:
        """A lease for one request, or QuotaExceededError (429) with when to retry."""
        running = self._running.get(tenant, 0)
        if self.max_concurrent and running >= self.max_concurrent:
            raise QuotaExceededError(
                f"tenant {tenant!r} has {running} requests running, its limit", retry_after_s=1
            )
        if self._tokens is not None and self._tokens.level(tenant) < 0:
            raise QuotaExceededError(
                f"tenant {tenant!r} is over its {self.max_tpm:g} tokens per minute",
                retry_after_s=_retry_after_s(self._tokens.wait_s(tenant, 0)),
            )
        if self._requests is not None:
            if self._requests.level(tenant) < 1:
                raise QuotaExceededError(
                    f"tenant {tenant!r} is over its {self.max_rps:g} requests per second",
                    retry_after_s=_retry_after_s(self._requests.wait_s(tenant, 1)),
                )
            self._requests.take(tenant, 1)
        self._running[tenant] = running + 1
        return Lease(self, tenant)

    def charge_tokens(self, tenant: str, num_tokens: int) -> None:
        """Count prompt or generated tokens against the tenant's tokens per minute."""
        if self._tokens is not None:
            self._tokens.take(tenant, num_tokens)

    def _release(self, tenant: str) -> None:
        running = self._running.get(tenant, 0) - 1
        if running > 0:
            self._running[tenant] = running
        else:
            self._running.pop(tenant, None)


def _retry_after_s(wait_s: float) -> int:
    """Whole seconds, at least 1 (Retry-After carries integers)."""
    return max(1, math.ceil(wait_s))
