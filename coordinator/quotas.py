"""Per-tenant quotas: concurrent API requests and requests per second, refused with 429 and
Retry-After (`QuotaExceededError`), distinct from overload (503): a tenant over its quota
retries later while other tenants keep being served.

The rate is a token bucket per tenant (capacity one second's worth, at least one request),
the usual shape of API rate limits: bursts up to the capacity, then the sustained rate. A
request takes a `Lease` when admitted and gives it back when its last generation ends; a
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
class TenantQuotas:
    max_concurrent: int = 0
    """Concurrent API requests per tenant; 0 is no limit."""
    max_rps: float = 0.0
    """Sustained requests per second per tenant; 0 is no limit."""
    clock: Callable[[], float] = time.monotonic
    _running: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    """tenant -> (tokens, when they were counted)."""

    def admit(self, tenant: str) -> Lease:
        """A lease for one request, or QuotaExceededError (429) with when to retry."""
        running = self._running.get(tenant, 0)
        if self.max_concurrent and running >= self.max_concurrent:
            raise QuotaExceededError(
                f"tenant {tenant!r} has {running} requests running, its limit", retry_after_s=1
            )
        if self.max_rps:
            self._take_token(tenant)
        self._running[tenant] = running + 1
        return Lease(self, tenant)

    @property
    def _capacity(self) -> float:
        return max(1.0, self.max_rps)

    def _take_token(self, tenant: str) -> None:
        now = self.clock()
        tokens, then = self._buckets.get(tenant, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - then) * self.max_rps)
        if tokens < 1:
            wait_s = (1 - tokens) / self.max_rps
            raise QuotaExceededError(
                f"tenant {tenant!r} is over its {self.max_rps:g} requests per second",
                retry_after_s=max(1, math.ceil(wait_s)),
            )
        self._buckets[tenant] = (tokens - 1, now)
        if len(self._buckets) > MAX_TRACKED_TENANTS:
            self._forget_full_buckets(now)

    def _forget_full_buckets(self, now: float) -> None:
        for name, (tokens, then) in list(self._buckets.items()):
            if tokens + (now - then) * self.max_rps >= self._capacity:
                del self._buckets[name]

    def _release(self, tenant: str) -> None:
        running = self._running.get(tenant, 0) - 1
        if running > 0:
            self._running[tenant] = running
        else:
            self._running.pop(tenant, None)
