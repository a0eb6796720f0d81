"""One request across the cluster: allocate KV on a decode worker, prefill, then stream decode.

    admit ─▶ D.Allocate ─▶ P.Prefill(handle) ─▶ first token ─▶ D.Decode(handle) ─▶ tokens …
                                    └── any failure or disconnect ─▶ D.Free(handle)

Placement: the decode worker with the most free KV blocks (heartbeat minus what
we allocated since), the prefill worker with the fewest prompt tokens in
flight. A colocated worker prefills its own handles.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from coordinator.admission import Admission
from coordinator.registry import WorkerRecord, WorkerRegistry
from disagg.config import DispatchConfig
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.sequence import TokenLogprob
from disagg.errors import DisaggError
from disagg.rpc import control_pb2 as pb
from disagg.rpc.convert import optional_logprob, sampling_to_proto
from disagg.rpc.status import invalid_request
from disagg.rpc.worker_limits import check_fits

log = logging.getLogger(__name__)


class WorkerError(DisaggError):
    """A worker failed or vanished while serving the request."""


@dataclass
class TokenUpdate:
    token_id: int
    time_s: float
    """time.time() when the token was produced (by the decode step, for decode tokens)."""
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


@dataclass
class RequestTrace:
    """Where one request's time went; the basis of TTFT/TBT and the per-response timings."""

    request_id: str
    arrival_s: float = field(default_factory=time.time)
    queue_s: float = 0.0
    prefill_s: float = 0.0
    prefill_queue_s: float = 0.0
    """Waiting for a batch slot on the prefill worker (part of TTFT)."""
    kv_transfer_s: float = 0.0
    kv_bytes: int = 0
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    prefill_worker: str = ""
    decode_worker: str = ""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tbt_s(self) -> list[float]:
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def mean_tbt_s(self) -> float | None:
        gaps = self.tbt_s
        return sum(gaps) / len(gaps) if gaps else None


class Dispatcher:
    def __init__(
        self, registry: WorkerRegistry, admission: Admission, config: DispatchConfig
    ) -> None:
        self.registry = registry
        self.admission = admission
        self.config = config
        self._cleanups: set[asyncio.Task] = set()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, trace: RequestTrace
    ) -> AsyncIterator[TokenUpdate]:
        """Yield every token; closing the iterator early cancels the request and frees its KV."""
        (decode, handle), trace.queue_s = await self.admission.admit(
            lambda: self._allocate(trace.request_id, prompt_ids, params)
        )
        trace.decode_worker = decode.worker_id
        finished = False
        try:
            first = await self._prefill(decode, handle, prompt_ids, params, trace)
            yield first
            if first.finish_reason:
                finished = True
                return
            async for update in self._decode(decode, handle, first, params, trace):
                yield update
                finished = update.finish_reason is not None
        finally:
            if not finished:
                self._release_soon(decode, handle.handle_id, "cancelled")
            self.admission.notify()

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
        num_tokens = len(prompt_ids) + params.max_tokens
        for worker in candidates:
            # NOTE: counted before the call, so that requests arriving together spread out
            # instead of all picking the worker that looked emptiest a moment ago.
            reserved = -(-num_tokens // max(1, worker.info.block_size))
            worker.reserved_blocks += reserved
            try:
                handle = await self._allocate_on(worker, request)
            except grpc.aio.AioRpcError as error:
                worker.reserved_blocks -= reserved
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:  # e.g. can never fit: a 400
                    raise invalid_request(error, "prompt") from error
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    log.warning("Allocate on %s failed: %s", worker.worker_id, error.code())
                continue
            return worker, handle
        return None

    async def _allocate_on(self, worker: WorkerRecord, request: pb.AllocateRequest) -> pb.KVHandle:
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
            call.add_done_callback(lambda done: self._free_orphan(worker, done))
            raise

    def _free_orphan(self, worker: WorkerRecord, call: asyncio.Future) -> None:
        if not call.cancelled() and call.exception() is None:
            self._release_soon(worker, call.result().handle_id, "cancelled")

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
        prefill.prompt_tokens_in_flight += len(prompt_ids)
        try:
            reply = await prefill.prefill.Prefill(request, timeout=self.config.prefill_timeout_s)
        except grpc.aio.AioRpcError as error:
            await self._free(decode, handle.handle_id, "prefill_failed")
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise invalid_request(error, "prompt") from error
            raise WorkerError(
                f"prefill worker {prefill.worker_id} failed: {error.details()}"
            ) from error
        finally:
            prefill.prompt_tokens_in_flight -= len(prompt_ids)
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

    def _release_soon(self, decode: WorkerRecord, handle_id: str, reason: str) -> None:
        """Free the handle from a task of its own.

        NOTE: cleanup often runs while the caller is being cancelled (a client that
        left), and a web framework's cancel scope cancels every await inside it
        again; an awaited Free would never be sent. A separate task is not in
        that scope, so the Free always goes out.
        """
        task = asyncio.ensure_future(self._free(decode, handle_id, reason))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _free(self, decode: WorkerRecord, handle_id: str, reason: str) -> None:
        try:
            await decode.decode.Free(
                pb.FreeRequest(handle_id=handle_id, reason=reason),
                timeout=self.config.free_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            log.warning("Free(%s) on %s failed: %s", handle_id, decode.worker_id, error.code())
