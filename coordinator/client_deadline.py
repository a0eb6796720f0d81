"""The client's deadline, read where each protocol carries one, so the work stops with it.

A request whose client has given up should stop using workers at once, not run on until
its stream notices: the deadline is carried down to every worker call as a gRPC deadline
(the workers abort the call and free its blocks when it passes) and the coordinator ends
the request itself at the deadline (504 / DEADLINE_EXCEEDED), whichever comes first.

Where the deadline comes from:
- KServe gRPC: the call's own deadline (`timeout=` on the client), as `time_remaining()`.
- OpenAI HTTP: the official SDK sends its timeout as `x-stainless-read-timeout` (seconds)
  with every request. For a non-streaming request no byte comes back before the end, so
  the read timeout is the whole request's deadline; a stream is only held to it between
  chunks, which the stall timeout already bounds, so a stream gets no deadline from it.
- KServe REST has no timeout field or header; its requests run without a deadline.

Deadlines are `time.monotonic()` instants; None means none.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

import grpc

from coordinator.errors import DeadlineExceededError, WorkerError

if TYPE_CHECKING:  # NOTE: generation imports the scheduler, which imports this module
    from coordinator.generation import GenerationRequest

T = TypeVar("T")

OPENAI_TIMEOUT_HEADER = "x-stainless-read-timeout"
MIN_CALL_TIMEOUT_S = 0.001
"""gRPC rejects a zero timeout; a deadline already past still makes the call fail at once."""


def deadline_after(timeout_s: float | None) -> float | None:
    """The instant `timeout_s` from now; None for no (or a meaningless) timeout."""
    if timeout_s is None or not math.isfinite(timeout_s) or timeout_s <= 0:
        return None
    return time.monotonic() + timeout_s


def openai_deadline_s(headers: Mapping[str, str], is_stream: bool) -> float | None:
    """The SDK's timeout as a deadline, for a non-streaming request (a bad value: none)."""
    value = headers.get(OPENAI_TIMEOUT_HEADER)
    if is_stream or value is None:
        return None
    try:
        return deadline_after(float(value))
    except ValueError:
        return None


def grpc_deadline_s(context: grpc.aio.ServicerContext) -> float | None:
    return deadline_after(context.time_remaining())


def apply_deadline(requests: Iterable[GenerationRequest], deadline_s: float | None) -> None:
    for request in requests:
        request.deadline_s = deadline_s


def call_timeout_s(configured_s: float, deadline_s: float | None) -> float:
    """A worker call's gRPC timeout: its configured one, cut to what the client has left."""
    if deadline_s is None:
        return configured_s
    return max(MIN_CALL_TIMEOUT_S, min(configured_s, deadline_s - time.monotonic()))


def has_passed(deadline_s: float | None) -> bool:
    return deadline_s is not None and time.monotonic() >= deadline_s


async def within_deadline(updates: AsyncIterator[T], deadline_s: float | None) -> AsyncIterator[T]:
    """`updates`, cut off with DeadlineExceededError once `deadline_s` passes.

    Cutting off cancels the pending step of `updates`, whose cleanup frees the request's
    KV on its workers. NOTE: a worker call that failed because its gRPC deadline (the
    client's) passed is the deadline's doing, not the worker's: no migration for it.
    """
    try:
        while True:
            try:
                if deadline_s is None:
                    update = await anext(updates)
                else:
                    remaining_s = max(0.0, deadline_s - time.monotonic())
                    update = await asyncio.wait_for(anext(updates), remaining_s)
            except StopAsyncIteration:
                return
            except (asyncio.TimeoutError, TimeoutError):  # NOTE: two names before 3.11
                raise DeadlineExceededError("the client's deadline passed") from None
            except WorkerError as error:
                if has_passed(deadline_s):
                    raise DeadlineExceededError("the client's deadline passed") from error
                raise
            yield update
    finally:
        await updates.aclose()
