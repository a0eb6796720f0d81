"""Which waiting request tries for KV room next: weighted fair queuing across tenants.

Weighted fair queuing (Demers, Keshav & Shenker 1989) in its self-clocked form (SCFQ,
Golestani 1994), with one request as the unit of service: each tenant with requests waiting
carries the virtual finish tag of its next one, `max(virtual time, its last tag) + 1/weight`;
the virtual time is the tag of the last request admitted, and the smallest tag goes next
(ties: the tenant waiting longest). So a tenant with 100 requests queued cannot starve one
with 1: the newcomer's tag is one step past the virtual time, as the burst's next one is.
Tenants that keep requests waiting are served in proportion to their weights; an idle
tenant banks no credit, since its tag restarts from the virtual time.

Within a tenant, requests go by priority (lower first, as vLLM's `priority`), then by
arrival. A priority orders one tenant's own requests; it never takes another tenant's share.

A full line makes room as DKS 1989 do for a full buffer: the newest request of the tenant
with the most waiting gives up its place (`victim`), so a burst cannot fill the line
against the others.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_REMEMBERED_TAGS = 1024
"""Past this many idle tenants' tags, those at or behind the virtual time are forgotten
(they carry no credit), so made-up tenant names cost no memory."""


@dataclass(eq=False)
class Waiter:
    tenant: str
    priority: int
    seq: int
    """Arrival order, unique."""
    turn: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when this waiter should try (again) for room."""
    is_evicted: bool = False
    """Its place went to another tenant's request (the line was full)."""

    @property
    def order(self) -> tuple[int, int]:
        return self.priority, self.seq


class FairQueue:
    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        """weights: tenant -> share (> 0) when tenants compete; unnamed tenants weigh 1."""
        self.weights = dict(weights or {})
        self.virtual_time = 0.0
        self._waiting: dict[str, list[Waiter]] = {}
        self._next_tags: dict[str, float] = {}
        """Backlogged tenant -> virtual finish tag of its next admitted request."""
        self._last_tags: dict[str, float] = {}
        """Tenant -> tag of its last admitted request."""
        self._seqs = itertools.count()

    def __len__(self) -> int:
        return sum(len(waiters) for waiters in self._waiting.values())

    def num_waiting(self, tenant: str) -> int:
        return len(self._waiting.get(tenant, ()))

    def push(self, tenant: str, priority: int = 0) -> Waiter:
        waiter = Waiter(tenant, priority, next(self._seqs))
        if tenant not in self._waiting:
            self._waiting[tenant] = []
            self._next_tags[tenant] = self._next_tag(tenant)
        self._waiting[tenant].append(waiter)
        return waiter

    def head(self) -> Waiter | None:
        """The waiter whose turn it is to try; None when nobody waits."""
        if not self._waiting:
            return None
        tenant = min(self._waiting, key=lambda t: (self._next_tags[t], self._waiting[t][0].seq))
        return min(self._waiting[tenant], key=lambda w: w.order)

    def remove(self, waiter: Waiter) -> None:
        """Take a waiter out of the line (admitted, gave up or evicted); idempotent."""
        waiters = self._waiting.get(waiter.tenant)
        if waiters is None or waiter not in waiters:
            return
        waiters.remove(waiter)
        if not waiters:
            del self._waiting[waiter.tenant]
            del self._next_tags[waiter.tenant]

    def charge(self, tenant: str) -> None:
        """One request of `tenant` was admitted: the virtual time moves to its tag."""
        tag = self._next_tags.get(tenant)
        if tag is None:
            tag = self._next_tag(tenant)
        self.virtual_time = tag
        self._last_tags[tenant] = tag
        if tenant in self._next_tags:
            self._next_tags[tenant] = tag + 1 / self.weight(tenant)
        if len(self._last_tags) > MAX_REMEMBERED_TAGS:
            self._forget_idle()

    def victim(self, tenant: str) -> Waiter | None:
        """The waiter to evict so that a request of `tenant` can join a full line: the newest
        of the tenant with the most waiting, if it has over one more than `tenant` would."""
        if not self._waiting:
            return None
        longest = max(self._waiting, key=lambda t: len(self._waiting[t]))
        if len(self._waiting[longest]) <= self.num_waiting(tenant) + 1:
            return None
        return max(self._waiting[longest], key=lambda w: w.order)

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def _next_tag(self, tenant: str) -> float:
        start = max(self.virtual_time, self._last_tags.get(tenant, 0.0))
        return start + 1 / self.weight(tenant)

    def _forget_idle(self) -> None:
        for tenant, tag in list(self._last_tags.items()):
            if tag <= self.virtual_time and tenant not in self._waiting:
                del self._last_tags[tenant]
