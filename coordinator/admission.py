"""The bounded wait for KV room: requests queue here when no decode worker can take them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from disagg.errors import DisaggError

T = TypeVar("T")


class OverloadedError(DisaggError):
    """No room now and the wait queue is full (or the wait timed out): retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, max_waiting: int = 256, queue_timeout_s: float = 30.0) -> None:
        self.max_waiting = max_waiting
        self.queue_timeout_s = queue_timeout_s
        self.num_waiting = 0
        self._room = asyncio.Event()

    def notify(self) -> None:
        """Capacity may have appeared: every waiter tries again."""
        self._room.set()

    async def admit(self, try_admit: Callable[[], Awaitable[T | None]]) -> tuple[T, float]:
        """Run `try_admit` until it returns a value; return it and the seconds spent queued."""
        start = time.monotonic()
        result = await try_admit()
        if result is not None:
            return result, 0.0
        if self.num_waiting >= self.max_waiting:
            raise OverloadedError(f"overloaded: {self.num_waiting} requests already waiting for KV")
        self.num_waiting += 1
        try:
            deadline = start + self.queue_timeout_s
            while result is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OverloadedError(
                        f"overloaded: no KV room within {self.queue_timeout_s:.0f} s"
                    )
                self._room.clear()
                try:
                    await asyncio.wait_for(self._room.wait(), remaining)
                except TimeoutError:
                    continue
                result = await try_admit()
            return result, time.monotonic() - start
        finally:
            self.num_waiting -= 1
