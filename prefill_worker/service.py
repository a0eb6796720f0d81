"""The prefill worker's gRPC face: run a prompt, ship its KV to the decode worker's handle."""

from __future__ import annotations

import grpc

from disagg.engine.sequence import Sequence
from disagg.engine.worker_loop import EngineLoop
from disagg.errors import InvalidRequestError
from disagg.kv.transfer import KVSender
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.convert import layouts_match, sampling_from_proto
from disagg.rpc.prefill_reply import run_prefill
from disagg.rpc.status import abort_invalid
from prefill_worker.kv_shipping import ShipKV
from prefill_worker.send_completions import SendCompletions


class PrefillService(pb_grpc.PrefillWorkerServicer):
    def __init__(self, loop: EngineLoop, sender: KVSender, completions: SendCompletions) -> None:
        self.loop = loop
        self.engine = loop.engine
        self.sender = sender
        self.completions = completions

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
        if request.handle.num_cached_tokens >= len(prompt):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "handle's cached prefix leaves nothing to send"
            )
        try:
            params = sampling_from_proto(request.sampling)
            self.engine.check_prompt(prompt, 0)  # only the prompt's blocks are ours
            seq = Sequence(prompt, params, request_id=request.request_id)
            await self.engine.grammars.prepare(seq)  # NOTE: compiles off the engine thread
        except InvalidRequestError as error:
            await abort_invalid(context, error)
        shipping = ShipKV(self.loop, self.sender, self.completions, request.handle)
        return await run_prefill(self.loop, seq, shipping)
