"""The colocated role: a decode worker that also runs Prefill itself, into the handle's blocks.

Same engine, same API as a prefill + decode pair, no KV transfer: this is the
baseline every benchmark compares disaggregation with.
"""

from __future__ import annotations

import grpc

from decode_worker.kv_handle import FreeReason, HandleState, KVHandle
from decode_worker.kv_handles import HandleTable
from decode_worker.service import refuse_stale
from disagg.engine.sequence import Sequence
from disagg.engine.worker_loop import EngineLoop
from disagg.errors import InvalidRequestError
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.prefill_reply import PrefillAborted, PrefillResult, run_prefill
from disagg.rpc.status import abort_invalid


class InPlacePrefill(PrefillResult):
    """Both ends are called once the sequence has left the engine, so the handle's blocks
    are no longer written to: from then on, ending the handle may free them."""

    def __init__(self, table: HandleTable, handle: KVHandle) -> None:
        super().__init__()
        self.table = table
        self.handle = handle

    def hand_over(self, seq: Sequence) -> None:
        self.table.end_in_place_prefill(self.handle)
        if not self.table.mark_ready(self.handle.handle_id):
            raise PrefillAborted(f"KV handle {self.handle.handle_id} ended during its prefill")
        self.handed_over(seq, 0, 0)

    def abandon(self, seq: Sequence) -> None:
        self.table.end_in_place_prefill(self.handle)
        self.table.fail(self.handle.handle_id, FreeReason.PREFILL_FAILED)


class ColocatedPrefillService(pb_grpc.PrefillWorkerServicer):
    def __init__(self, table: HandleTable, loop: EngineLoop) -> None:
        self.table = table
        self.loop = loop

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        await refuse_stale(self.table, request.handle.handle_id, context)
        handle = self.table.get(request.handle.handle_id)
        if handle is None or handle.state != HandleState.ALLOCATED:
            await not_fresh(context)
        if list(request.prompt_token_ids) != handle.prompt_token_ids:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "prompt differs from the allocated one"
            )
        seq = Sequence(
            list(handle.prompt_token_ids),
            handle.sequence.params,  # what Allocate carried; the request's copy is the same
            request_id=request.request_id,
            block_table=list(handle.block_ids),
            num_computed_tokens=handle.num_cached_tokens,  # shared blocks: their KV is here
            num_cached_tokens=handle.num_cached_tokens,
            owns_blocks=False,
        )
        try:
            await self.loop.engine.grammars.prepare(seq)  # NOTE: compiles off the engine thread
        except InvalidRequestError as error:  # the coordinator frees the handle, as after any 400
            await abort_invalid(context, error)
        if self.table.begin_in_place_prefill(handle.handle_id) is None:  # freed meanwhile
            await not_fresh(context)
        return await run_prefill(self.loop, seq, InPlacePrefill(self.table, handle))


async def not_fresh(context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "KV handle is not ours or not fresh")
