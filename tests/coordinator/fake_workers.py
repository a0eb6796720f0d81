"""Fake prefill and decode workers for the cluster scheduler, with faults on demand.

The "model" is a pure function of the context (`next_token`), so a sequence recomputed
elsewhere from prompt + tokens-so-far continues exactly as the undisturbed one would, as the
real model does in float32; tests compare a disturbed run with `expected_tokens`.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from coordinator.admission import Admission
from coordinator.cluster_scheduler import ClusterScheduler
from coordinator.registry import WorkerRegistry
from disagg.config import DispatchConfig
from disagg.rpc import control_pb2 as pb

VOCAB = 1000


def next_token(context: list[int]) -> int:
    return (sum(context) * 31 + len(context)) % VOCAB


def expected_tokens(prompt_ids: list[int], max_tokens: int) -> list[int]:
    context = list(prompt_ids)
    for _ in range(max_tokens):
        context.append(next_token(context))
    return context[len(prompt_ids) :]


def rpc_error(code: grpc.StatusCode, details: str = "injected") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeStream:
    """A server stream as grpc.aio gives it: iterate it, or cancel it."""

    def __init__(self, events) -> None:
        self.events = events
        self.is_cancelled = False

    def __aiter__(self):
        return self.events

    def cancel(self) -> None:
        self.is_cancelled = True


class FakeWorker:
    """One worker's stubs (Allocate, Prefill, Decode, Free), all on the same object.

    `break_after`: the Decode stream raises UNAVAILABLE after that many tokens;
    `hang_after`: it goes silent after that many tokens; `fail_prefill`: Prefill raises
    UNAVAILABLE; `hang_prefill`: Prefill never answers. Each holds for `num_faults` calls, then the worker behaves.
    """

    def __init__(
        self,
        worker_id: str,
        break_after: int | None = None,
        hang_after: int | None = None,
        fail_prefill: bool = False,
        hang_prefill: bool = False,
        num_faults: int = 1,
    ) -> None:
        self.worker_id = worker_id
        self.break_after, self.hang_after = break_after, hang_after
        self.fail_prefill, self.hang_prefill = fail_prefill, hang_prefill
        self.num_faults = num_faults
        self.handles: dict[str, tuple[list[int], int]] = {}
        """handle id -> (prompt ids, max_tokens) of every live handle."""
        self.allocations: list[pb.AllocateRequest] = []
        self.prefills: list[pb.PrefillRequest] = []
        self.freed: list[str] = []

    async def Allocate(self, request: pb.AllocateRequest, timeout: float) -> pb.KVHandle:
        self.allocations.append(request)
        handle_id = f"{self.worker_id}-h{len(self.allocations)}"
        prompt = list(request.prompt_token_ids)
        self.handles[handle_id] = (prompt, request.sampling.max_tokens)
        return pb.KVHandle(
            handle_id=handle_id, worker_id=self.worker_id, num_prompt_tokens=len(prompt)
        )

    async def Prefill(self, request: pb.PrefillRequest, timeout: float) -> pb.PrefillResponse:
        self.prefills.append(request)
        await asyncio.sleep(0.001)
        if self.fail_prefill and self._take_fault():
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "Stream removed")
        if self.hang_prefill and self._take_fault():
            await asyncio.Event().wait()
        prompt = list(request.prompt_token_ids)
        reason = "length" if request.sampling.max_tokens == 1 else ""
        return pb.PrefillResponse(first_token_id=next_token(prompt), finish_reason=reason)

    def Decode(self, request: pb.DecodeRequest, timeout: float) -> FakeStream:
        return FakeStream(self._decode(request))

    async def _decode(self, request: pb.DecodeRequest):
        prompt, max_tokens = self.handles[request.handle_id]
        context = [*prompt, request.first_token_id]
        for i in range(max_tokens - 1):
            if i == self.break_after and self._take_fault():
                raise rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            if i == self.hang_after and self._take_fault():
                await asyncio.Event().wait()  # silent forever, like a SIGSTOPped process
            await asyncio.sleep(0.001)
            token = next_token(context)
            context.append(token)
            reason = "length" if i == max_tokens - 2 else ""
            yield pb.TokenEvent(token_id=token, time_unix_s=time.time(), finish_reason=reason)
        self.handles.pop(request.handle_id, None)

    async def Free(self, request: pb.FreeRequest, timeout: float) -> pb.FreeResponse:
        self.freed.append(request.handle_id)
        return pb.FreeResponse(freed=self.handles.pop(request.handle_id, None) is not None)

    def _take_fault(self) -> bool:
        if self.num_faults <= 0:
            return False
        self.num_faults -= 1
        return True


def fake_cluster(
    decode: list[FakeWorker], prefill: list[FakeWorker], **dispatch: object
) -> ClusterScheduler:
    """A scheduler over the fakes, registered as they would be (must run in an event loop)."""
    registry = WorkerRegistry()
    for role, workers in (("decode", decode), ("prefill", prefill)):
        for worker in workers:
            info = pb.WorkerInfo(
                worker_id=worker.worker_id,
                role=role,
                address="127.0.0.1:1",
                total_kv_blocks=1000,
                block_size=16,
                vocab_size=VOCAB,
                max_model_len=4096,
            )
            registry.register(info)
            record = registry.get(worker.worker_id)
            record.decode = record.prefill = worker
    config = DispatchConfig(**{"disagg_policy": "always", **dispatch})
    return ClusterScheduler(registry, Admission(queue_timeout_s=2.0), config)
