"""The prefill worker's gRPC face: run a prompt, ship its KV to the decode worker's handle."""

from __future__ import annotations

import grpc

from disagg.engine.llm_engine import LLMEngine
from disagg.engine.sequence import Sequence
from disagg.engine.worker_loop import EngineLoop
from disagg.errors import InvalidRequestError
from disagg.kv.transfer import KVSender
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.convert import layouts_match, sampling_from_proto
from disagg.rpc.prefill_reply import PrefillResult, run_prefill


class ShipKV(PrefillResult):
    """Sends each computed layer to the handle's decode worker; frees local blocks after."""

    def __init__(self, engine: LLMEngine, sender: KVSender, handle: pb.KVHandle) -> None:
        super().__init__()
        self.engine = engine
        self.sender = sender
        self.endpoint = handle.zmq_endpoint
        self.handle_id = handle.handle_id

    def ship(self, seq: Sequence, layer: int, start: int, end: int) -> None:
        k, v = self.engine.kv_cache.token_range(layer, seq.block_table, start, end)
        self.sender.send_layer(self.endpoint, self.handle_id, layer, start, k, v)

    def hand_over(self, seq: Sequence) -> tuple[int, int]:
        try:
            num_layers = self.engine.kv_cache.layout.num_layers
            done = self.sender.finish(
                self.endpoint, self.handle_id, seq.num_prompt_tokens, num_layers
            )
            return done.nbytes, done.checksum
        finally:
            # NOTE: only now, with every frame out of the process, may the blocks be reused.
            self.engine.block_manager.release(seq)

    def abandon(self, seq: Sequence) -> None:
        self.sender.abort(self.handle_id)


class PrefillService(pb_grpc.PrefillWorkerServicer):
    def __init__(self, engine: LLMEngine, loop: EngineLoop, sender: KVSender) -> None:
        self.engine = engine
        self.loop = loop
        self.sender = sender
        self.outstanding_prompt_tokens = 0

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        prompt = list(request.prompt_token_ids)
        if not layouts_match(self.engine.kv_cache.layout, request.handle.layout):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the decode worker's KV layout differs from ours",
            )
        if request.handle.num_prompt_tokens != len(prompt):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "handle was allocated for another prompt"
            )
        try:
            params = sampling_from_proto(request.sampling)
            self.engine.validate(prompt, params)
        except InvalidRequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        seq = Sequence(prompt, params, request_id=request.request_id)
        self.outstanding_prompt_tokens += len(prompt)
        try:
            return await run_prefill(
                self.loop, seq, ShipKV(self.engine, self.sender, request.handle)
            )
        finally:
            self.outstanding_prompt_tokens -= len(prompt)
