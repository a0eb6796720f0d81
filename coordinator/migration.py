"""Moving a sequence to another worker after a fault, so that the client sees one stream.

The coordinator keeps every request's prompt and the tokens it has streamed so far. When a
worker fails, hangs or leaves the rotation mid-request, the sequence is re-admitted
elsewhere with prompt + tokens-so-far as its prompt: a fresh Allocate and Prefill whose
first token is the next one, with what is left of the request's budgets (`resumed_params`);
a constrained request's grammar state is rebuilt on the new workers from every token so far.
In float32 the recomputed KV gives the same greedy tokens as the undisturbed run; a seeded
request gets the same draws too (`resumed_seed`). Like the decode-stream migration of
vLLM/Dynamo, but it covers the prefill phase as well.

What counts as a fault (`is_worker_fault`): any gRPC error but INVALID_ARGUMENT (the
request's own fault, which no other worker would accept either), a stream that ends or
aborts without finishing, a stall (`stall_timeout_s` without a token on a worker whose
engine makes no progress, or three times that on a busy one: coordinator/stall_watch.py),
and the worker leaving the rotation (`LostWatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TypeVar

import grpc

from coordinator.errors import WorkerError
from disagg.engine.sampling_params import SamplingParams

T = TypeVar("T")

PREFILL_FAILED, DECODE_FAILED, STALL = "prefill_failed", "decode_failed", "stall"
"""Causes of a migration, as the metric's `cause` label spells them."""

SEED_MIX = 0x9E3779B97F4A7C15
SEED_MOD = 1 << 63
"""The sampler's per-position mixing: a seeded draw at output position i uses the RNG seeded
with (seed * SEED_MIX + i) mod 2**63 (disagg/engine/sampler.py)."""


class WorkerFault(WorkerError):
    """A worker failed, hung or vanished while serving one attempt of a request."""

    def __init__(self, cause: str, worker_id: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.worker_id = worker_id
        self.detected_s = time.monotonic()


def is_worker_fault(error: grpc.aio.AioRpcError) -> bool:
    """True when another worker may well succeed where this one failed."""
    return error.code() != grpc.StatusCode.INVALID_ARGUMENT


def resumed_seed(seed: int, num_produced: int) -> int:
    """The seed whose draw at output position i equals `seed`'s at `num_produced + i`.

    Solves s' * MIX = s * MIX + n (mod 2**63): MIX is odd, so it has an inverse.
    """
    return (seed + num_produced * pow(SEED_MIX, -1, SEED_MOD)) % SEED_MOD


def resumed_params(params: SamplingParams, num_produced: int) -> SamplingParams:
    """What is left of the request after `num_produced` tokens reached the client.

    The resumed prompt ends with those tokens (`num_resumed_tokens`): a constrained request's
    grammar replays them on the new workers, so the output stays one document.
    """
    if num_produced == 0:
        return params
    seed = None if params.seed is None else resumed_seed(params.seed, num_produced)
    return replace(
        params,
        max_tokens=params.max_tokens - num_produced,
        min_tokens=max(0, params.min_tokens - num_produced),
        seed=seed,
        num_resumed_tokens=params.num_resumed_tokens + num_produced,  # grammar, penalties
    )


@dataclass(eq=False)
class LostFlag:
    """Set when the worker it watches leaves the rotation."""

    worker_id: str
    event: asyncio.Event = field(default_factory=asyncio.Event)


class LostWatch:
    """Which attempts run on which worker, so that a worker's loss interrupts them at once
    instead of leaving their streams to hang until a deadline."""

    def __init__(self) -> None:
        self._flags: dict[str, set[LostFlag]] = {}

    def lost(self, worker_id: str) -> None:
        for flag in self._flags.get(worker_id, ()):
            flag.event.set()

    @contextmanager
    def watching(self, worker_id: str) -> Iterator[LostFlag]:
        flag = LostFlag(worker_id)
        flags = self._flags.setdefault(worker_id, set())
        flags.add(flag)
        try:
            yield flag
        finally:
            flags.discard(flag)
            if not flags:
                self._flags.pop(worker_id, None)


class Interrupted(Exception):
    """`first_of` gave up: a watched worker was lost (`flag`), or the timeout passed (None)."""

    def __init__(self, flag: LostFlag | None) -> None:
        super().__init__("lost" if flag else "timed out")
        self.flag = flag


async def next_or_none(items: AsyncIterator[T]) -> T | None:
    """The next item, or None at the end (a task cannot carry StopAsyncIteration well)."""
    try:
        return await anext(items)
    except StopAsyncIteration:
        return None


async def close_quietly(items: AsyncIterator[T]) -> None:
    """Close an async iterator we stopped reading, so that its `finally` runs now, not when
    it is garbage collected (gRPC's tracing wrapper ends a stream's span there). One still
    inside a cancelled read is left to that cancellation."""
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(RuntimeError):  # "already running": the read still unwinds
            await aclose()


async def first_of(work: Awaitable[T], flags: list[LostFlag], timeout_s: float | None) -> T:
    """`work`'s result, unless a flag is set or `timeout_s` passes first (Interrupted; the
    work is cancelled)."""
    task = asyncio.ensure_future(work)
    if any(flag.event.is_set() for flag in flags):
        task.cancel()
        raise Interrupted(next(flag for flag in flags if flag.event.is_set()))
    waiters = {asyncio.ensure_future(flag.event.wait()): flag for flag in flags}
    try:
        done, _ = await asyncio.wait(
            [task, *waiters], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiter in waiters:
            waiter.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise Interrupted(next((waiters[w] for w in done if w in waiters), None))
