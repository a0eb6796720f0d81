"""The decode worker's gRPC face: Allocate a KV handle, Decode from it, Free it.

A handle of another incarnation of this worker (a stale epoch, see kv_handles.py)
is refused with FAILED_PRECONDITION; a handle whose lease lapsed is ended as if
freed (`expire_leases`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from decode_worker.kv_handle import FreeReason, HandleHooks, KVHandle
from decode_worker.kv_handles import HandleTable
from disagg import tracing
from disagg.engine.llm_engine import LLMEngine
from disagg.engine.sequence import Sequence, SequenceStatus
from disagg.engine.worker_loop import Abort, Admit, EngineLoop, SequenceListener
from disagg.errors import InvalidRequestError, OutOfBlocksError
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.convert import layout_to_proto, logprob_to_proto, sampling_from_proto
from disagg.rpc.status import abort_invalid
from disagg.rpc.thread_bridge import ThreadSafeQueue

log = logging.getLogger(__name__)


@dataclass
class TokenOut:
    token_id: int | None
    time_unix_s: float
    finish_reason: str = ""
    logprob: object = None
    error: str = ""
    step: tuple[int, int] | None = None
    """(step number, sequences in that step) while tracing: the decode step batch it was in."""


class DecodeStream(SequenceListener):
    """One Decode RPC's view of its sequence, fed from the engine thread."""

    def __init__(self) -> None:
        self.events: ThreadSafeQueue[TokenOut] = ThreadSafeQueue()

    def on_token(self, seq: Sequence) -> None:
        self.events.put(self.token_out(seq))

    def token_out(self, seq: Sequence) -> TokenOut:
        logprob = seq.output_logprobs[-1] if seq.params.logprobs is not None else None
        reason = seq.finish_reason or ""
        return TokenOut(seq.output_token_ids[-1], time.time(), reason, logprob)

    def on_finished(self, seq: Sequence) -> None:
        self.events.put(TokenOut(None, time.time(), seq.finish_reason or "abort"))

    def on_error(self, seq: Sequence, error: Exception) -> None:
        self.events.put(TokenOut(None, time.time(), "error", error=str(error)))


class TracedDecodeStream(DecodeStream):
    """A DecodeStream whose tokens also say which step batch made them (tracing on only)."""

    def __init__(self, loop: EngineLoop) -> None:
        super().__init__()
        self.loop = loop

    def token_out(self, seq: Sequence) -> TokenOut:
        token = super().token_out(seq)
        token.step = (self.loop.num_steps, self.loop.num_in_last_step)
        return token


def step_event(span: Any, token: TokenOut) -> None:
    """One `decode.step` event on the Decode RPC's span per step the sequence was in (not a
    span per token: a long stream would make thousands). No token ids: spans leave the
    cluster, and the text is the client's."""
    step, batch_size = token.step or (0, 0)
    attributes = {"step": step, "batch_size": batch_size}
    span.add_event("decode.step", attributes, timestamp=int(token.time_unix_s * 1e9))


class SettleWaiters(HandleHooks):
    """Wakes coroutines waiting for a handle to become READY (or fail) without a thread each."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._events: dict[str, asyncio.Event] = {}

    async def wait(self, handle: KVHandle, timeout_s: float) -> bool:
        event = self._events.setdefault(handle.handle_id, asyncio.Event())
        try:
            if not handle.settled.is_set():
                await asyncio.wait_for(event.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:  # NOTE: not the builtin TimeoutError before Python 3.11
            return False
        finally:
            self._events.pop(handle.handle_id, None)

    def on_ready(self, handle: KVHandle) -> None:
        self._loop.call_soon_threadsafe(self._wake, handle.handle_id)

    def on_free(self, handle: KVHandle, reason: str) -> None:
        self._loop.call_soon_threadsafe(self._wake, handle.handle_id)

    def _wake(self, handle_id: str) -> None:
        event = self._events.get(handle_id)
        if event is not None:
            event.set()


async def refuse_stale(
    table: HandleTable, handle_id: str, context: grpc.aio.ServicerContext
) -> None:
    """Abort with FAILED_PRECONDITION when the handle belongs to another incarnation."""
    owner = table.stale_owner(handle_id)
    if owner is not None:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"KV handle of {owner or 'no worker'} reached {table.worker_id} (a stale epoch)",
        )


class DecodeService(pb_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        engine: LLMEngine,
        table: HandleTable,
        loop: EngineLoop,
        waiters: SettleWaiters,
        worker_id: str,
        zmq_endpoint: str,
    ) -> None:
        self.engine = engine
        self.table = table
        self.loop = loop
        self.waiters = waiters
        self.worker_id = worker_id
        self.zmq_endpoint = zmq_endpoint
        self._decoding: dict[str, Sequence] = {}

    async def Allocate(
        self, request: pb.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> pb.KVHandle:
        prompt = list(request.prompt_token_ids)
        try:
            params = sampling_from_proto(request.sampling)
            self.engine.check_prompt(prompt, params.max_tokens)
            # NOTE: compiled now, off the engine thread, so that Decode finds it cached
            await self.engine.grammars.compile_ahead(params.constraint)
            if self.engine.scheduler.has_preempted:  # they resume first, or could starve
                raise OutOfBlocksError("preempted sequences are waiting for KV blocks")
            handle = self.table.allocate(
                request.request_id, prompt, params.max_tokens, request.lease_s or None
            )
        except InvalidRequestError as error:  # NeverFitsError included: waiting cannot help
            await abort_invalid(context, error)
        except OutOfBlocksError as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        handle.sequence = Sequence(
            prompt,
            params,
            request_id=request.request_id,
            block_table=list(handle.block_ids),
            num_computed_tokens=len(prompt),
            status=SequenceStatus.WAITING_FOR_KV,
        )
        remaining_s = handle.deadline_s - time.monotonic()
        return pb.KVHandle(
            handle_id=handle.handle_id,
            worker_id=self.worker_id,
            zmq_endpoint=self.zmq_endpoint,
            block_ids=handle.block_ids,
            layout=layout_to_proto(self.engine.kv_cache.layout),
            num_prompt_tokens=handle.num_prompt_tokens,
            num_cached_tokens=handle.num_cached_tokens,
            expires_at_unix_s=time.time() + remaining_s,
        )

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):
        await refuse_stale(self.table, request.handle_id, context)
        handle = self.table.get(request.handle_id)
        if handle is None:
            reason = self.table.end_reason(request.handle_id) or "unknown"
            await context.abort(grpc.StatusCode.NOT_FOUND, f"KV handle is gone: {reason}")
        await self.waiters.wait(handle, max(0.0, handle.deadline_s - time.monotonic()))
        if self.table.claim(handle.handle_id) is None:
            reason = handle.free_reason or f"KV not ready ({handle.state.name})"
            self.table.fail(handle.handle_id, FreeReason.EXPIRED)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"KV handle failed: {reason}")
        seq = handle.sequence
        seq.output_token_ids.append(request.first_token_id)
        span = tracing.current_span()
        stream = DecodeStream() if span is None else TracedDecodeStream(self.loop)
        self._decoding[handle.handle_id] = seq
        reason = FreeReason.CANCELLED
        try:
            try:
                await self.engine.grammars.prepare(seq)  # NOTE: off the engine thread
            except InvalidRequestError as error:  # its tokens do not follow its grammar
                reason = FreeReason.ERROR
                await abort_invalid(context, error)
            self.loop.submit(Admit(seq, stream))
            while True:
                event = await stream.events.get()
                if event.error:
                    reason = FreeReason.ERROR
                    await context.abort(grpc.StatusCode.INTERNAL, event.error)
                if event.token_id is None:
                    reason = FreeReason.FINISHED if event.finish_reason != "abort" else reason
                    yield pb.TokenEvent(
                        time_unix_s=event.time_unix_s, finish_reason=event.finish_reason
                    )
                    return
                if span is not None:
                    step_event(span, event)
                yield pb.TokenEvent(
                    token_id=event.token_id,
                    time_unix_s=event.time_unix_s,
                    finish_reason=event.finish_reason,
                    logprob=logprob_to_proto(event.logprob),
                )
                if event.finish_reason:
                    reason = FreeReason.FINISHED
                    return
        finally:
            self._decoding.pop(handle.handle_id, None)
            if reason != FreeReason.FINISHED:
                self.loop.submit(Abort(seq))  # a cancelled stream is a disconnect: free blocks
            self.table.release(handle.handle_id, reason)

    async def Free(
        self, request: pb.FreeRequest, context: grpc.aio.ServicerContext
    ) -> pb.FreeResponse:
        await refuse_stale(self.table, request.handle_id, context)
        freed = self.end(request.handle_id, request.reason or FreeReason.CANCELLED)
        return pb.FreeResponse(freed=freed)

    def end(self, handle_id: str, reason: str) -> bool:
        """End a handle in any state: abort its sequence if one decodes, free its blocks.
        False when it was already gone."""
        seq = self._decoding.get(handle_id)
        if seq is not None:
            self.loop.submit(Abort(seq))
        freed = self.table.fail(handle_id, reason) if reason != FreeReason.FINISHED else False
        return freed or self.table.release(handle_id, reason)

    async def expire_leases(self, interval_s: float) -> None:
        """Every `interval_s`, end the handles whose coordinator stopped renewing them."""
        while True:
            await asyncio.sleep(interval_s)
            for handle_id in self.table.lapsed():
                log.warning("KV handle %s: lease expired, freeing it", handle_id)
                self.end(handle_id, FreeReason.LEASE_EXPIRED)

    def load(self) -> int:
        """Sequences decoding plus handles still waiting for their KV."""
        return self.loop.num_sequences + self.table.num_pending
