"""A prefill and a decode worker's services in this process, on a tiny random model.

No gRPC server and no `disagg serve`: the servicers are called directly with a
stand-in context, KV crosses a real ZeroMQ ipc socket in a temp dir, and each
worker's engine runs in its own loop thread, as in the worker processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from decode_worker.colocated import ColocatedPrefillService
from decode_worker.kv_handles import HandleTable
from decode_worker.service import DecodeService, SettleWaiters
from disagg.config import KVReservation
from disagg.engine.llm_engine import EngineConfig, LLMEngine
from disagg.engine.sampling_params import SamplingParams
from disagg.engine.worker_loop import EngineLoop
from disagg.kv.transfer import KVReceiver, KVSender
from disagg.rpc import control_pb2 as pb
from disagg.rpc.convert import sampling_to_proto
from prefill_worker.send_completions import SendCompletions
from prefill_worker.service import PrefillService
from tests.helpers import tiny_loaded

BLOCK_SIZE = 4


class RpcAborted(Exception):
    """What `context.abort` raises here, with what a client would see."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: dict) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.trailers = code, details, trailers


class FakeContext:
    async def abort(self, code, details="", trailing_metadata=()) -> None:
        raise RpcAborted(code, details, dict(trailing_metadata))


def tiny_engine(
    num_kv_blocks: int = 256,
    prefix_caching: bool = True,
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens,
) -> LLMEngine:
    config = EngineConfig(
        block_size=BLOCK_SIZE,
        num_kv_blocks=num_kv_blocks,
        no_prefix_caching=not prefix_caching,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    return LLMEngine(config, loaded=tiny_loaded())


@dataclass
class DecodeSide:
    engine: LLMEngine
    table: HandleTable
    loop: EngineLoop
    service: DecodeService
    receiver: KVReceiver | None

    async def allocate(
        self, prompt: list[int], params: SamplingParams, lease_s: float = 0.0
    ) -> pb.KVHandle:
        request = pb.AllocateRequest(
            request_id="r",
            prompt_token_ids=prompt,
            sampling=sampling_to_proto(params),
            lease_s=lease_s,
        )
        return await self.service.Allocate(request, FakeContext())

    def decode(self, handle: pb.KVHandle, first_token_id: int) -> AsyncIterator[pb.TokenEvent]:
        request = pb.DecodeRequest(handle_id=handle.handle_id, first_token_id=first_token_id)
        return self.service.Decode(request, FakeContext())

    def is_idle(self) -> bool:
        manager = self.engine.block_manager
        return manager.num_free_blocks == manager.num_blocks and self.service.load() == 0


@dataclass
class PrefillSide:
    engine: LLMEngine
    loop: EngineLoop
    sender: KVSender
    completions: SendCompletions
    service: PrefillService

    async def prefill(
        self, prompt: list[int], params: SamplingParams, handle: pb.KVHandle
    ) -> pb.PrefillResponse:
        request = pb.PrefillRequest(
            request_id="r",
            prompt_token_ids=prompt,
            sampling=sampling_to_proto(params),
            handle=handle,
        )
        return await self.service.Prefill(request, FakeContext())

    def is_idle(self) -> bool:
        manager = self.engine.block_manager
        idle = self.loop.num_sequences == 0 and self.completions.num_pending == 0
        return idle and manager.num_free_blocks == manager.num_blocks


@contextlib.asynccontextmanager
async def decode_side(
    tmp_path: Path,
    num_kv_blocks: int = 256,
    colocated: bool = False,
    prefix_caching: bool = True,
    worker_id: str = "decode-test",
    reservation: KVReservation = "on-demand",
) -> AsyncIterator[DecodeSide]:
    engine = tiny_engine(num_kv_blocks, prefix_caching)
    waiters = SettleWaiters()
    table = HandleTable(
        engine.block_manager,
        engine.kv_cache,
        10.0,
        10.0,
        hooks=[waiters],
        prefix_cache=engine.scheduler.prefix_cache,
        worker_id=worker_id,
        reservation=reservation,
    )
    receiver = None if colocated else KVReceiver(f"ipc://{tmp_path}/kv.sock", table).start()
    loop = EngineLoop(engine, tick=table.expire, tick_s=0.05)
    loop.start()
    endpoint = receiver.endpoint if receiver else ""
    service = DecodeService(engine, table, loop, waiters, worker_id, endpoint)
    try:
        yield DecodeSide(engine, table, loop, service, receiver)
    finally:
        loop.stop()
        if receiver is not None:
            receiver.stop()


def colocated_prefill(side: DecodeSide) -> ColocatedPrefillService:
    return ColocatedPrefillService(side.table, side.loop)


@contextlib.asynccontextmanager
async def prefill_side(
    send_timeout_s: float = 30.0,
    prefix_caching: bool = True,
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens,
) -> AsyncIterator[PrefillSide]:
    engine = tiny_engine(
        prefix_caching=prefix_caching, max_num_batched_tokens=max_num_batched_tokens
    )
    sender = KVSender(send_timeout_s=send_timeout_s, linger_s=0)
    completions = SendCompletions().start()
    loop = EngineLoop(engine, tick_s=0.05)
    loop.start()
    try:
        yield PrefillSide(
            engine, loop, sender, completions, PrefillService(loop, sender, completions)
        )
    finally:
        loop.stop()
        completions.stop()
        sender.close()
