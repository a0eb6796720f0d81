"""Calls addressed to a worker incarnation, over real gRPC on loopback: the restarted worker
refuses what was meant for its previous life, unary and streaming alike."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from disagg.ports import add_grpc_port, grpc_server
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.worker_epoch import EpochInterceptor, addressed_to


class EchoDecode(pb_grpc.DecodeWorkerServicer):
    async def Free(self, request: pb.FreeRequest, context) -> pb.FreeResponse:
        return pb.FreeResponse(freed=True)

    async def Decode(self, request: pb.DecodeRequest, context):
        yield pb.TokenEvent(token_id=request.first_token_id)


async def calls(port: int, worker_id: str | None) -> tuple[object, object]:
    """Free's and Decode's outcome: the reply, or the status code of the refusal."""
    interceptors = addressed_to(worker_id) if worker_id else None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as ch:
        stub = pb_grpc.DecodeWorkerStub(ch)
        outcomes = []
        for call in (
            lambda: stub.Free(pb.FreeRequest(handle_id="h"), timeout=5),
            lambda: _first(stub.Decode(pb.DecodeRequest(first_token_id=7), timeout=5)),
        ):
            try:
                outcomes.append(await call())
            except grpc.aio.AioRpcError as error:
                outcomes.append((error.code(), error.details()))
        return tuple(outcomes)


async def _first(stream) -> int:
    async for event in stream:
        return event.token_id


@pytest.mark.parametrize(
    ("worker_id", "is_refused"),
    [("decode-0-e2", False), (None, False), ("decode-0-e1", True)],
)
def test_a_worker_refuses_calls_addressed_to_another_incarnation(worker_id, is_refused):
    async def scenario() -> tuple[object, object]:
        server = grpc_server([EpochInterceptor("decode-0-e2")])
        pb_grpc.add_DecodeWorkerServicer_to_server(EchoDecode(), server)
        port = add_grpc_port(server, "127.0.0.1", 0, "--port")
        await server.start()
        try:
            return await calls(port, worker_id)
        finally:
            await server.stop(grace=None)

    free, decode = asyncio.run(scenario())
    if is_refused:
        for code, details in (free, decode):
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "decode-0-e1" in details and "decode-0-e2" in details
    else:
        assert free.freed and decode == 7
