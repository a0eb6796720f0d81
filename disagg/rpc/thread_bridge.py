"""Handing results from the engine thread to coroutines on an asyncio loop."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class ThreadSafeQueue(Generic[T]):
    """Put from any thread, get on the loop that created it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[T] = asyncio.Queue()

    def put(self, item: T) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> T:
        return await self._queue.get()


class ThreadSafeFuture(Generic[T]):
    """Resolve from any thread, await on the loop that created it; first resolution wins."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future[T] = self._loop.create_future()

    def set_result(self, result: T) -> None:
        self._loop.call_soon_threadsafe(self._settle, result, None)

    def set_exception(self, error: BaseException) -> None:
        self._loop.call_soon_threadsafe(self._settle, None, error)

    def _settle(self, result: T | None, error: BaseException | None) -> None:
        if self._future.done():
            return
        if error is not None:
            self._future.set_exception(error)
        else:
            self._future.set_result(result)

    def __await__(self):
        return self._future.__await__()
