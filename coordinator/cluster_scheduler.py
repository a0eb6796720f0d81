"""The cluster scheduler: where one request runs, and driving it across the workers.

Allocate KV on a decode worker, prefill, then stream decode:

    admit ─▶ D.Allocate ─▶ P.Prefill(handle) ─▶ first token ─▶ D.Decode(handle) ─▶ tokens …
                                    └── any failure or disconnect ─▶ D.Free(handle)

Placement: the decode worker with the most free KV blocks (as the registry
estimates them between heartbeats), the prefill worker with the fewest prompt
tokens in flight. A colocated worker prefills its own handles. A request that
could not fit the largest decode worker's whole pool is refused at once (400)
instead of queueing until the admission timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from coordinator.admission import Admission
from coordinator.errors import WorkerError
from coordinator.registry import WorkerRecord, WorkerRegistry
from coordinator.request_timing import RequestTrace
from disagg.config import DispatchConfig
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import TokenLogprob
from disagg.kv.block_manager import initial_num_tokens
from disagg.rpc import control_pb2 as pb
from disagg.rpc.convert import optional_logprob, sampling_to_proto
from disagg.rpc.status import invalid_request
from disagg.rpc.worker_limits import check_fits

log = logging.getLogger(__name__)

FREEING_RETRY_S = 0.05
"""How soon to try again a worker that refused for lack of room while the registry counts
room there: blocks given back are freed by its engine thread a moment after Free returns."""


@dataclass
class TokenUpdate:
    token_id: int
    time_s: float
    """time.time() when the token was produced (by the decode step, for decode tokens)."""
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


class ClusterScheduler:
    def __init__(
        self, registry: WorkerRegistry, admission: Admission, config: DispatchConfig
    ) -> None:
        self.registry = registry
        self.admission = admission
        self.config = config
        self._cleanups: set[asyncio.Task] = set()

    def check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse (400) a request no registered decode worker could ever hold, checked against
        the limits workers advertise (vocabulary, context, pool size).

        Without this the worker's "no room" reads like a busy pool: the request would wait
        out the admission timeout and get a 503 for something no retry can fix.
        """
        check_fits([w.info for w in self.registry.healthy("decode")], prompt_ids, params.max_tokens)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, trace: RequestTrace
    ) -> AsyncIterator[TokenUpdate]:
        """Yield every token; closing the iterator early cancels the request and frees its KV."""
        (decode, handle), trace.queue_s = await self.admission.admit(
            lambda: self._allocate(trace.request_id, prompt_ids, params)
        )
        trace.decode_worker = decode.worker_id
        num_blocks = self.registry.blocks_for(
            decode, initial_num_tokens(len(prompt_ids), params.max_tokens)
        )
        finished, release_reason = False, "cancelled"
        try:
            try:
                first = await self._prefill(decode, handle, prompt_ids, params, trace)
            except WorkerError:
                release_reason = "prefill_failed"
                raise
            yield first
            if first.finish_reason:
                finished = True
                return
            async for update in self._decode(decode, handle, first, params, trace):
                yield update
                finished = update.finish_reason is not None
        finally:
            if finished:  # the worker freed the blocks as it finished
                self.registry.release_blocks(decode, num_blocks)
            else:
                self._release_soon(decode, handle.handle_id, release_reason, num_blocks)

    async def _allocate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[WorkerRecord, pb.KVHandle] | None:
        """Try decode workers, most free blocks first; None when none has room now."""
        candidates = sorted(self.registry.healthy("decode"), key=lambda w: -w.free_blocks_estimate)
        if not candidates:
            raise WorkerError("no decode worker is registered")
        check_fits([w.info for w in candidates], prompt_ids, params.max_tokens)
        request = pb.AllocateRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling_to_proto(params)
        )
        # NOTE: a decode worker reserves the prompt plus a lookahead and grows on demand
        num_tokens = initial_num_tokens(len(prompt_ids), params.max_tokens)
        for worker in candidates:
            # NOTE: counted before the call, so that requests arriving together spread out
            # instead of all picking the worker that looked emptiest a moment ago.
            reserved = self.registry.reserve_blocks(worker, num_tokens)
            try:
                handle = await self._allocate_on(worker, request, reserved)
            except grpc.aio.AioRpcError as error:
                self.registry.unreserve_blocks(worker, reserved)
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:  # e.g. can never fit: a 400
                    raise invalid_request(error, "prompt") from error
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    log.warning("Allocate on %s failed: %s", worker.worker_id, error.code())
                elif worker.free_blocks_estimate >= reserved:
                    self.admission.notify_later(FREEING_RETRY_S)  # NOTE: see FREEING_RETRY_S
                continue
            return worker, handle
        return None

    async def _allocate_on(
        self, worker: WorkerRecord, request: pb.AllocateRequest, num_blocks: int = 0
    ) -> pb.KVHandle:
        """Allocate, and if the request is cancelled meanwhile, free whatever it got.

        NOTE: cancelling the RPC does not undo it: the worker may already have
        reserved the blocks. So the call finishes in its own task, and a handle
        that arrives for a request that is gone is freed at once.
        """
        call = asyncio.ensure_future(
            worker.decode.Allocate(request, timeout=self.config.allocate_timeout_s)
        )
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._free_orphan(worker, done, num_blocks))
            raise

    def _free_orphan(self, worker: WorkerRecord, call: asyncio.Future, num_blocks: int) -> None:
        if not call.cancelled() and call.exception() is None:
            self._release_soon(worker, call.result().handle_id, "cancelled", num_blocks)
        else:
            self.registry.unreserve_blocks(worker, num_blocks)

    def _pick_prefill(self, decode: WorkerRecord) -> WorkerRecord:
        if decode.info.role == "colocated":
            return decode
        candidates = [w for w in self.registry.healthy("prefill") if w.info.role == "prefill"]
        if not candidates:
            raise WorkerError("no prefill worker is registered")
        return min(candidates, key=lambda w: w.prompt_tokens_in_flight)

    async def _prefill(
        self,
        decode: WorkerRecord,
        handle: pb.KVHandle,
        prompt_ids: list[int],
        params: SamplingParams,
        trace: RequestTrace,
    ) -> TokenUpdate:
        prefill = self._pick_prefill(decode)
        trace.prefill_worker = prefill.worker_id
        request = pb.PrefillRequest(
            request_id=trace.request_id,
            prompt_token_ids=prompt_ids,
            sampling=sampling_to_proto(params),
            handle=handle,
        )
        self.registry.start_prefill(prefill, len(prompt_ids))
        try:
            reply = await prefill.prefill.Prefill(request, timeout=self.config.prefill_timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise invalid_request(error, "prompt") from error
            raise WorkerError(
                f"prefill worker {prefill.worker_id} failed: {error.details()}"
            ) from error
        finally:
            self.registry.end_prefill(prefill, len(prompt_ids))
        trace.first_token_s = time.time()
        trace.token_times_s.append(trace.first_token_s)
        trace.prefill_queue_s = reply.queue_s
        trace.prefill_s, trace.kv_transfer_s = reply.prefill_s, reply.transfer_s
        trace.kv_bytes = reply.kv_bytes
        logprob = optional_logprob(reply, "first_logprob", reply.first_token_id)
        return TokenUpdate(
            reply.first_token_id, trace.first_token_s, logprob, reply.finish_reason or None
        )

    async def _decode(
        self,
        decode: WorkerRecord,
        handle: pb.KVHandle,
        first: TokenUpdate,
        params: SamplingParams,
        trace: RequestTrace,
    ) -> AsyncIterator[TokenUpdate]:
        request = pb.DecodeRequest(handle_id=handle.handle_id, first_token_id=first.token_id)
        stream = decode.decode.Decode(request, timeout=self.config.decode_timeout_s)
        offset_s: float | None = None
        try:
            async for event in stream:
                if not event.HasField("token_id"):
                    reason = event.finish_reason
                    raise WorkerError(
                        f"decode worker {decode.worker_id} ended the request: {reason}"
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
        except grpc.aio.AioRpcError as error:
            raise WorkerError(
                f"decode worker {decode.worker_id} failed: {error.details()}"
            ) from error
        finally:
            stream.cancel()

    def _release_soon(
        self, decode: WorkerRecord, handle_id: str, reason: str, num_blocks: int
    ) -> None:
        """Free the handle from a task of its own.

        NOTE: cleanup often runs while the caller is being cancelled (a client that
        left), and a web framework's cancel scope cancels every await inside it
        again; an awaited Free would never be sent. A separate task is not in
        that scope, so the Free always goes out.
        """
        task = asyncio.ensure_future(self._free(decode, handle_id, reason, num_blocks))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _free(
        self, decode: WorkerRecord, handle_id: str, reason: str, num_blocks: int
    ) -> None:
        """Free the handle; once the worker has its blocks back, the registry counts them free."""
        try:
            await decode.decode.Free(
                pb.FreeRequest(handle_id=handle_id, reason=reason),
                timeout=self.config.free_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            log.warning("Free(%s) on %s failed: %s", handle_id, decode.worker_id, error.code())
            return  # the next heartbeat says what is free
        self.registry.release_blocks(decode, num_blocks)
