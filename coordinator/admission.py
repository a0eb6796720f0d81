"""The bounded wait for KV room: requests queue here when no decode worker can take them,
and tenants share the room fairly.

Waiters wait in a `FairQueue` (coordinator/fair_queue.py): one line per tenant, the next to
try chosen across tenants by weighted fair queuing. Only the head tries to get room; a new
arrival tries at once only when nobody is waiting (so it cannot overtake the line).
`notify()` (a worker joined, a heartbeat reported free blocks, a request gave its blocks
back) wakes the head; a head that is admitted, gives up or times out wakes the next one at
once, since room may remain. A notify that fires while a try is in flight is never lost:
each waiter has its own flag, cleared before the try, not after it, and a waiter woken
after another became the head hands the wake on to it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from coordinator.errors import OverloadedError
from coordinator.fair_queue import FairQueue, Waiter
from coordinator.timeouts import wait_event

__all__ = ["Admission", "OverloadedError"]

T = TypeVar("T")

DEFAULT_TENANT = "default"


class Admission:
    def __init__(
        self,
        max_waiting: int = 256,
        queue_timeout_s: float = 30.0,
        tenant_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.max_waiting = max_waiting
        self.queue_timeout_s = queue_timeout_s
        self._queue = FairQueue(tenant_weights)
        self._num_notified = 0
        """Counts notify() calls, so a try that raced one knows to try again."""

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    def notify(self) -> None:
        """Capacity may have appeared: the head of the line tries again."""
        self._num_notified += 1
        head = self._queue.head()
        if head is not None:
            head.turn.set()

    def notify_later(self, delay_s: float) -> None:
        """notify() after `delay_s`: for room that is on its way but not there yet."""
        asyncio.get_running_loop().call_later(delay_s, self.notify)

    async def admit(
        self,
        try_admit: Callable[[], Awaitable[T | None]],
        tenant: str = DEFAULT_TENANT,
        priority: int = 0,
    ) -> tuple[T, float]:
        """Run `try_admit` until it returns a value; return it and the seconds spent queued.

        `priority` orders the tenant's own waiting requests (lower first). Raises
        OverloadedError when the line is full or the wait runs past queue_timeout_s.
        """
        start_s = time.monotonic()
        notified_before = self._num_notified
        if not len(self._queue):
            result = await try_admit()
            if result is not None:
                self._queue.charge(tenant)
                return result, 0.0
        self._make_room(tenant)
        waiter = self._queue.push(tenant, priority)
        if self._num_notified != notified_before:
            self.notify()  # room appeared while the first try was in flight
        try:
            result = await self._wait_turns(waiter, try_admit, start_s)
            self._queue.charge(tenant)  # NOTE: before leaving, so its next tag follows this one
            return result, time.monotonic() - start_s
        finally:
            self._queue.remove(waiter)
            self.notify()  # the next in line tries now: room may remain, or we left the head

    def _make_room(self, tenant: str) -> None:
        """A place in the line for `tenant`, taken from the longest tenant's newest waiter
        when the line is full; OverloadedError when that would not be fairer."""
        if len(self._queue) < self.max_waiting:
            return
        victim = self._queue.victim(tenant)
        if victim is None:
            raise OverloadedError(f"overloaded: {len(self._queue)} requests already waiting for KV")
        self._queue.remove(victim)
        victim.is_evicted = True
        victim.turn.set()

    async def _wait_turns(
        self, waiter: Waiter, try_admit: Callable[[], Awaitable[T | None]], start_s: float
    ) -> T:
        deadline_s = start_s + self.queue_timeout_s
        while True:
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0 or not await wait_event(waiter.turn, remaining_s):
                raise OverloadedError(f"overloaded: no KV room within {self.queue_timeout_s:.0f} s")
            waiter.turn.clear()  # NOTE: before the try, so a notify during it sets the flag again
            if waiter.is_evicted:
                raise OverloadedError("overloaded: the KV wait queue is full")
            if self._queue.head() is not waiter:
                self.notify()  # another became the head since: the wake is its
                continue
            result = await try_admit()
            if result is not None:
                return result
