"""The cluster scheduler: where one request runs, and driving it across the workers.

Allocate KV on a decode worker, prefill, then stream decode:

    admit ─▶ D.Allocate ─▶ P.Prefill(handle) ─▶ first token ─▶ D.Decode(handle) ─▶ tokens …
                                    └── any failure or disconnect ─▶ D.Free(handle)

Placement: the decode worker with the most free KV blocks (as the registry
estimates them between heartbeats), the prefill worker with the fewest prompt
tokens in flight, each net of the prompt's prefix it likely holds already
(coordinator/prefix_routing.py). A colocated worker prefills its own handles,
and so does a decode worker when `disagg_policy` says (never; auto, when its cost
model finds it cheaper: coordinator/disagg_policy.py). A request that
could not fit the largest decode worker's whole pool is refused at once (400)
instead of queueing until the admission timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from collections.abc import Set as AbstractSet

import grpc

from coordinator.admission import Admission
from coordinator.client_deadline import call_timeout_s, within_deadline
from coordinator.decode_stream import TokenUpdate, decode_tokens
from coordinator.disagg_policy import observe_prefill, place_prefill
from coordinator.errors import WorkerError
from coordinator.migration import (
    DECODE_FAILED,
    PREFILL_FAILED,
    Interrupted,
    LostFlag,
    LostWatch,
    WorkerFault,
    first_of,
    is_worker_fault,
    resumed_params,
)
from coordinator.prefix_routing import PrefixIndex
from coordinator.registry import WorkerRecord, WorkerRegistry, keepalive_options
from coordinator.request_timing import RequestTrace
from coordinator.stall_watch import StallWatch
from disagg import tracing
from disagg.config import DispatchConfig
from disagg.engine.sampling_params import SamplingParams
from disagg.kv.block_manager import initial_num_tokens
from disagg.rpc import control_pb2 as pb
from disagg.rpc.convert import optional_logprob, sampling_to_proto
from disagg.rpc.status import invalid_request
from disagg.rpc.worker_limits import check_fits

log = logging.getLogger(__name__)

FREEING_RETRY_S = 0.05
"""How soon to try again a worker that refused for lack of room while the registry counts
room there: blocks given back are freed by its engine thread a moment after Free returns."""


class ClusterScheduler:
    def __init__(
        self, registry: WorkerRegistry, admission: Admission, config: DispatchConfig
    ) -> None:
        self.registry = registry
        self.admission = admission
        self.config = config
        self._cleanups: set[asyncio.Task] = set()
        self._lost = LostWatch()
        registry.on_lost(self._lost.lost)
        self.prefix_index = PrefixIndex()
        registry.on_lost(self.prefix_index.forget)
        registry.channel_options = keepalive_options(config.keepalive_s)
        registry.set_handle_lease(config.handle_lease_s)
        self.stall = StallWatch(registry, config.stall_timeout_s)
        """When a silent decode stream is hung rather than its worker busy."""

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
        """Yield every token; closing the iterator early cancels the request and frees its KV.

        A worker fault moves the sequence to another worker (coordinator/migration.py), up to
        `max_migrations` times; the tokens continue where they stopped, then a WorkerError.
        """
        produced: list[int] = []
        avoid: set[str] = set()
        fault: WorkerFault | None = None
        while True:
            attempt = within_deadline(
                self._attempt(
                    prompt_ids + produced, resumed_params(params, len(produced)), trace, avoid
                ),
                trace.deadline_s,
            )
            try:
                async for update in attempt:
                    if fault is not None:
                        trace.recovery_s.append(time.monotonic() - fault.detected_s)
                        fault = None
                    produced.append(update.token_id)
                    yield update
                    if update.finish_reason:
                        return
                return
            except WorkerFault as error:
                self._note_fault(error, trace, avoid, len(produced))
                fault = fault or error  # NOTE: recovery counts from the first fault
            finally:
                await attempt.aclose()

    def _note_fault(
        self, fault: WorkerFault, trace: RequestTrace, avoid: set[str], num_produced: int
    ) -> None:
        """Count the fault as a migration, or give up once the request had its share."""
        if len(trace.migrations) >= self.config.max_migrations:
            raise WorkerError(
                f"{fault} (after {len(trace.migrations)} migrations, giving up)"
            ) from fault
        trace.migrations.append(fault.cause)
        avoid.add(fault.worker_id)
        span = tracing.current_span()
        if span is not None:
            moved = {"cause": fault.cause, "worker": fault.worker_id, "num_produced": num_produced}
            span.add_event("migration", moved)
        log.warning(
            "request %s: %s; migrating after %d tokens (%s)",
            trace.request_id, fault, num_produced, fault.cause,
        )  # fmt: skip

    async def _attempt(
        self, prompt_ids: list[int], params: SamplingParams, trace: RequestTrace, avoid: set[str]
    ) -> AsyncIterator[TokenUpdate]:
        """One placement of the sequence: allocate, prefill, decode; WorkerFault on a fault."""
        with tracing.span("admission", num_prompt_tokens=len(prompt_ids)) as span:
            (decode, handle), queue_s = await self.admission.admit(
                lambda: self._allocate(trace.request_id, prompt_ids, params, avoid),
                trace.tenant,
                trace.priority,
            )
            span.set_attribute("queue_s", queue_s)
            span.set_attribute("decode_worker", decode.worker_id)
        trace.queue_s += queue_s
        trace.decode_worker = decode.worker_id
        self.registry.hold_handle(decode, handle.handle_id)  # NOTE: heartbeats renew its lease
        num_blocks = self.registry.blocks_for(
            decode, initial_num_tokens(len(prompt_ids), params.max_tokens)
        )
        finished, release_reason = False, "cancelled"
        with self._lost.watching(decode.worker_id) as decode_lost:
            try:
                try:
                    first = await self._prefill(
                        decode, handle, prompt_ids, params, trace, avoid, decode_lost
                    )
                except WorkerError:
                    release_reason = "prefill_failed"
                    raise
                finished = first.finish_reason is not None
                if finished:  # NOTE: the decode worker never hears of it: free the handle now
                    release_reason = "finished"
                yield first
                if finished:
                    return
                async for update in self._decode(decode, handle, first, trace, decode_lost):
                    # NOTE: before the yield: a consumer done at the finish closes us there
                    finished = update.finish_reason is not None
                    yield update
            finally:
                self.registry.let_go_handle(decode, handle.handle_id)
                if finished and release_reason != "finished":  # the worker freed them itself
                    self.registry.release_blocks(decode, num_blocks)
                else:
                    self._release_soon(decode, handle.handle_id, release_reason, num_blocks)

    async def _allocate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        avoid: AbstractSet[str] = frozenset(),
    ) -> tuple[WorkerRecord, pb.KVHandle] | None:
        """Try decode workers, the best by prefix cache and free blocks first, those this
        request saw fail only when no other is left; None when none has room now.

        NOTE: a worker that is gone has left the rotation; one this request saw fail that
        is still in it may well serve the next attempt (a stall is often just load, e.g.
        after taking over a lost worker's sequences), so it is a last resort, not barred.
        `max_migrations` still bounds the retries.
        """
        healthy = self.registry.healthy("decode")
        fresh = [w for w in healthy if w.worker_id not in avoid]
        candidates = self.prefix_index.order_decode(fresh or healthy, prompt_ids)
        if not candidates:
            raise WorkerError("no decode worker is registered")
        check_fits([w.info for w in candidates], prompt_ids, params.max_tokens)
        request = pb.AllocateRequest(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling=sampling_to_proto(params),
            lease_s=self.registry.lease_s,
        )
        # NOTE: a decode worker reserves the prompt plus a lookahead and grows on demand
        num_tokens = initial_num_tokens(len(prompt_ids), params.max_tokens)
        for worker in candidates:
            # NOTE: counted before the call, so that requests arriving together spread out
            # instead of all picking the worker that looked emptiest a moment ago.
            reserved = self.registry.reserve_blocks(worker, num_tokens)
            try:
                handle = await self._allocate_on(worker, request, reserved)
            except grpc.aio.UsageError:  # its channel closed: it left the rotation meanwhile
                self.registry.unreserve_blocks(worker, reserved)
                continue
            except grpc.aio.AioRpcError as error:
                self.registry.unreserve_blocks(worker, reserved)
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:  # e.g. can never fit: a 400
                    raise invalid_request(error, "prompt") from error
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    log.warning("Allocate on %s failed: %s", worker.worker_id, error.code())
                    self.registry.drop_if_unreachable(worker, error)
                elif worker.free_blocks_estimate >= reserved:
                    self.admission.notify_later(FREEING_RETRY_S)  # NOTE: see FREEING_RETRY_S
                continue
            self.prefix_index.record(worker, prompt_ids)
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

    def _pick_prefill(
        self,
        decode: WorkerRecord,
        handle: pb.KVHandle,
        prompt_ids: list[int],
        avoid: set[str],
        trace: RequestTrace,
    ) -> WorkerRecord:
        """The worker to prefill on, by `disagg_policy` (coordinator/disagg_policy.py): a
        prefill worker, or the decode worker itself (in place, as the colocated role does);
        the decision goes in the trace."""
        candidates = [
            w
            for w in self.registry.healthy("prefill")
            if w.info.role == "prefill" and w.worker_id not in avoid
        ]
        prefill, decision = place_prefill(
            self.config, decode, candidates, prompt_ids, handle.num_cached_tokens, self.prefix_index
        )
        trace.prefill_placement, trace.placement_reason = decision.placement, decision.reason
        if prefill is not decode:
            self.prefix_index.record(prefill, prompt_ids)
        return prefill

    async def _prefill(
        self,
        decode: WorkerRecord,
        handle: pb.KVHandle,
        prompt_ids: list[int],
        params: SamplingParams,
        trace: RequestTrace,
        avoid: set[str],
        decode_lost: LostFlag,
    ) -> TokenUpdate:
        prefill = self._pick_prefill(decode, handle, prompt_ids, avoid, trace)
        trace.prefill_worker = prefill.worker_id
        request = pb.PrefillRequest(
            request_id=trace.request_id,
            prompt_token_ids=prompt_ids,
            sampling=sampling_to_proto(params),
            handle=handle,
        )
        self.registry.start_prefill(prefill, len(prompt_ids))
        try:
            with self._lost.watching(prefill.worker_id) as prefill_lost:
                timeout_s = call_timeout_s(self.config.prefill_timeout_s, trace.deadline_s)
                call = prefill.prefill.Prefill(request, timeout=timeout_s)
                started_s = time.monotonic()
                reply = await first_of(call, [prefill_lost, decode_lost], None)
                observe_prefill(prefill, time.monotonic() - started_s, reply)
        except Interrupted as stop:
            cause = DECODE_FAILED if stop.flag is decode_lost else PREFILL_FAILED
            lost_id = stop.flag.worker_id
            raise WorkerFault(cause, lost_id, f"worker {lost_id} was lost") from None
        except grpc.aio.UsageError:  # its channel closed: it left the rotation meanwhile
            raise WorkerFault(PREFILL_FAILED, prefill.worker_id, "prefill worker left") from None
        except grpc.aio.AioRpcError as error:
            if not is_worker_fault(error):
                raise invalid_request(error, "prompt") from error
            self.registry.drop_if_unreachable(prefill, error)
            # NOTE: a prefill that failed for its decode worker's loss is the decode's fault
            blamed = decode if self.registry.get(decode.worker_id) is None else prefill
            cause = DECODE_FAILED if blamed is decode else PREFILL_FAILED
            raise WorkerFault(
                cause, blamed.worker_id, f"prefill on {prefill.worker_id} failed: {error.details()}"
            ) from error
        finally:
            self.registry.end_prefill(prefill, len(prompt_ids))
        now_s = time.time()
        trace.token_times_s.append(now_s)
        if trace.first_token_s is None:
            trace.first_token_s = now_s
            trace.prefill_queue_s = reply.queue_s
            trace.prefill_s, trace.kv_transfer_s = reply.prefill_s, reply.transfer_s
            trace.num_cached_tokens = reply.num_cached_tokens
            trace.num_kv_cached_tokens = handle.num_cached_tokens
        trace.kv_bytes += reply.kv_bytes
        logprob = optional_logprob(reply, "first_logprob", reply.first_token_id)
        return TokenUpdate(reply.first_token_id, now_s, logprob, reply.finish_reason or None)

    def _decode(
        self,
        decode: WorkerRecord,
        handle: pb.KVHandle,
        first: TokenUpdate,
        trace: RequestTrace,
        decode_lost: LostFlag,
    ) -> AsyncIterator[TokenUpdate]:
        """The decode stream's tokens (coordinator/decode_stream.py); WorkerFault if it fails,
        stalls (coordinator/stall_watch.py) or its worker leaves the rotation."""
        request = pb.DecodeRequest(handle_id=handle.handle_id, first_token_id=first.token_id)
        timeout_s = call_timeout_s(self.config.decode_timeout_s, trace.deadline_s)
        return decode_tokens(
            self.registry, self.stall, decode, request, timeout_s, trace, decode_lost
        )

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
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as error:
            log.warning("Free(%s) on %s failed: %r", handle_id, decode.worker_id, error)
            return  # the next heartbeat says what is free
        self.registry.release_blocks(decode, num_blocks)
