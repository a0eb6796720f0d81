"""One Decode stream read into TokenUpdates: a sequence's tokens from its decode worker, until
it finishes, or a WorkerFault that says what went wrong so that the sequence can migrate
(coordinator/migration.py). How long the stream may stay silent is the StallWatch's call
(coordinator/stall_watch.py): a busy worker is waited for, a hung one is not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from coordinator.migration import (
    DECODE_FAILED,
    STALL,
    Interrupted,
    LostFlag,
    WorkerFault,
    close_quietly,
    next_or_none,
)
from coordinator.registry import WorkerRecord, WorkerRegistry
from coordinator.request_timing import RequestTrace
from coordinator.stall_watch import StallWatch
from disagg.engine.sequence import TokenLogprob
from disagg.rpc import control_pb2 as pb
from disagg.rpc.convert import optional_logprob


@dataclass
class TokenUpdate:
    token_id: int
    time_s: float
    """time.time() when the token was produced (by the decode step, for decode tokens)."""
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


async def decode_tokens(
    registry: WorkerRegistry,
    stall: StallWatch,
    decode: WorkerRecord,
    request: pb.DecodeRequest,
    timeout_s: float,
    trace: RequestTrace,
    decode_lost: LostFlag,
) -> AsyncIterator[TokenUpdate]:
    """The decode stream's tokens; WorkerFault if it fails, ends unfinished, stays silent
    past the stall watch's deadline, or its worker leaves the rotation (`decode_lost`).

    Each token's time is moved onto this process's clock (trace.token_times_s).
    """
    stream = decode.decode.Decode(request, timeout=timeout_s)
    offset_s: float | None = None
    events = aiter(stream)
    silent_since_s = time.monotonic()
    try:
        while True:
            read = asyncio.ensure_future(next_or_none(events))
            event = await stall.next_event(read, decode_lost, decode.worker_id, silent_since_s)
            silent_since_s = time.monotonic()
            if event is None or not event.HasField("token_id"):
                reason = "end of stream" if event is None else event.finish_reason
                raise WorkerFault(
                    DECODE_FAILED, decode.worker_id, f"decode on {decode.worker_id}: {reason}"
                )
            if offset_s is None:  # NOTE: one clock: the first gap is ours end to end
                offset_s = time.time() - event.time_unix_s
            trace.token_times_s.append(event.time_unix_s + offset_s)
            logprob = optional_logprob(event, "logprob", event.token_id)
            yield TokenUpdate(
                event.token_id, event.time_unix_s, logprob, event.finish_reason or None
            )
            if event.finish_reason:
                return
    except Interrupted as stop:
        if stop.flag:
            message = f"decode worker {decode.worker_id} was lost"
            raise WorkerFault(DECODE_FAILED, decode.worker_id, message) from None
        why = stall.why(decode.worker_id, silent_since_s, time.monotonic())
        raise WorkerFault(
            STALL, decode.worker_id, f"decode worker {decode.worker_id} {why}"
        ) from None
    except grpc.aio.UsageError:  # its channel closed: it left the rotation meanwhile
        raise WorkerFault(DECODE_FAILED, decode.worker_id, "decode worker left") from None
    except grpc.aio.AioRpcError as error:
        registry.drop_if_unreachable(decode, error)
        raise WorkerFault(
            DECODE_FAILED, decode.worker_id, f"decode on {decode.worker_id}: {error.details()}"
        ) from error
    finally:
        stream.cancel()
        await close_quietly(events)
