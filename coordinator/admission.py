"""The bounded wait for KV room: requests queue here, first come first served, when no decode
worker can take them.

Waiters form a FIFO line. Only the head of the line tries to get room; a new arrival tries
at once only when nobody is waiting (so it cannot overtake the line). `notify()` (a worker
joined, a heartbeat reported free blocks, a request gave its blocks back) wakes the head;
a head that is admitted, gives up or times out wakes the next one at once, since room may
remain. A notify that fires while a try is in flight is never lost: each waiter has its own
flag, cleared before the try, not after it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from coordinator.errors import OverloadedError
from coordinator.timeouts import wait_event

__all__ = ["Admission", "OverloadedError"]

T = TypeVar("T")


class Admission:
    def __init__(self, max_waiting: int = 256, queue_timeout_s: float = 30.0) -> None:
        self.max_waiting = max_waiting
        self.queue_timeout_s = queue_timeout_s
        self._line: deque[asyncio.Event] = deque()
        self._num_notified = 0
        """Counts notify() calls, so a try that raced one knows to try again."""

    @property
    def num_waiting(self) -> int:
        return len(self._line)

    def notify(self) -> None:
        """Capacity may have appeared: the head of the line tries again."""
        self._num_notified += 1
        if self._line:
            self._line[0].set()

    def notify_later(self, delay_s: float) -> None:
        """notify() after `delay_s`: for room that is on its way but not there yet."""
        asyncio.get_running_loop().call_later(delay_s, self.notify)

    async def admit(self, try_admit: Callable[[], Awaitable[T | None]]) -> tuple[T, float]:
        """Run `try_admit` until it returns a value; return it and the seconds spent queued.

        Raises OverloadedError when the line is full or the wait runs past queue_timeout_s.
        """
        start_s = time.monotonic()
        notified_before = self._num_notified
        if not self._line:
            result = await try_admit()
            if result is not None:
                return result, 0.0
        if len(self._line) >= self.max_waiting:
            raise OverloadedError(f"overloaded: {len(self._line)} requests already waiting for KV")
        turn = asyncio.Event()
        self._line.append(turn)
        if self._num_notified != notified_before and self._line[0] is turn:
            turn.set()  # room appeared while the first try was in flight
        try:
            return await self._wait_turns(turn, try_admit, start_s), time.monotonic() - start_s
        finally:
            self._line.remove(turn)
            self.notify()  # the next in line tries now: room may remain, or we left the head

    async def _wait_turns(
        self, turn: asyncio.Event, try_admit: Callable[[], Awaitable[T | None]], start_s: float
    ) -> T:
        deadline_s = start_s + self.queue_timeout_s
        while True:
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0 or not await wait_event(turn, remaining_s):
                raise OverloadedError(f"overloaded: no KV room within {self.queue_timeout_s:.0f} s")
            turn.clear()  # NOTE: before the try, so a notify during it sets the flag again
            result = await try_admit()
            if result is not None:
                return result
