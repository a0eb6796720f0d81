"""Running a request's generations, the same for every protocol.

A protocol hands over the `GenerationRequest`s one API request parsed into (a batch, or
n choices) and gets completions or chunks back. Here, once for all protocols:

- one pre-check of the whole batch before any prompt starts, so a bad prompt costs no KV;
- a task per generation, each with the `RequestTrace` created for it here;
- fan-out where one failure cancels the rest;
- cancelling when the client disconnects, exactly once.

NOTE: HTTP streaming runs under an anyio cancel scope (Starlette), which re-cancels every
await inside it until the scope exits; cleanup awaited there would be cancelled too,
including the Free that returns the KV blocks. So generations run in tasks of their own,
which `close()` cancels once and does not await; their cleanup then runs to the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import ClassVar

from coordinator.errors import ClientGoneError
from coordinator.generation import Completion, GenerationRequest, Generator, TextChunk
from coordinator.request_timing import RequestTrace


def trace_for(request: GenerationRequest) -> RequestTrace:
    return RequestTrace(
        request.request_id,
        tenant=request.tenant,
        priority=request.priority,
        deadline_s=request.deadline_s,
    )


class GenerationRunner:
    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    def check_all(self, requests: list[GenerationRequest]) -> None:
        """Errors a client can fix, for every generation, before any of them starts."""
        for request in requests:
            self.generator.check(request)

    async def complete_all(
        self,
        requests: list[GenerationRequest],
        disconnected: Callable[[], Awaitable[None]] | None = None,
    ) -> list[Completion]:
        """Every generation's completion, in order. One failing cancels the rest; the client
        leaving first (what `disconnected()` awaits finishes) cancels all and raises
        ClientGoneError."""
        self.check_all(requests)
        tasks = [asyncio.ensure_future(self.generator.complete(r, trace_for(r))) for r in requests]
        work = asyncio.ensure_future(asyncio.gather(*tasks))
        gone = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            await asyncio.wait(
                {work} | ({gone} if gone else set()), return_when=asyncio.FIRST_COMPLETED
            )
            if not work.done():
                raise ClientGoneError()
            return list(work.result())
        finally:
            if gone is not None:
                gone.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(work, *tasks, return_exceptions=True)

    def stream(self, requests: list[GenerationRequest]) -> ChunkStreams:
        """The generations' chunks as they come, after the pre-check; close it when done."""
        self.check_all(requests)
        return ChunkStreams(self.generator, requests)


class ChunkStreams:
    """Each generation streams from a task of its own into one queue of (index, item)."""

    _closing: ClassVar[set[asyncio.Task]] = set()  # strong references while cleanup runs

    def __init__(self, generator: Generator, requests: list[GenerationRequest]) -> None:
        self.traces = [trace_for(r) for r in requests]
        self._queue: asyncio.Queue[tuple[int, TextChunk | Exception | None]] = asyncio.Queue()
        self._tasks = [
            asyncio.ensure_future(self._pump(i, generator.stream(r, trace)))
            for i, (r, trace) in enumerate(zip(requests, self.traces))
        ]
        self._num_open = len(requests)
        self._is_closed = False

    async def _pump(self, index: int, stream: AsyncGenerator[TextChunk, None]) -> None:
        try:
            async for chunk in stream:
                self._queue.put_nowait((index, chunk))
            self._queue.put_nowait((index, None))
        except Exception as error:
            self._queue.put_nowait((index, error))
        finally:
            await stream.aclose()

    async def next(self) -> tuple[int, TextChunk | Exception] | None:
        """The next chunk, or a generation's error (it ends that generation); None once all
        generations have ended."""
        while self._num_open:
            index, item = await self._queue.get()
            if item is None or isinstance(item, Exception):
                self._num_open -= 1
            if item is not None:
                return index, item
        return None

    async def next_chunk(self) -> TextChunk | None:
        """For a single generation: its next chunk, None at the end; its error, raised."""
        item = await self.next()
        if item is None:
            return None
        if isinstance(item[1], Exception):
            raise item[1]
        return item[1]

    def close(self) -> None:
        """Cancel what still runs, once; the tasks finish their cleanup on their own."""
        if self._is_closed:
            return
        self._is_closed = True
        for task in self._tasks:
            if not task.done():
                task.cancel()
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
