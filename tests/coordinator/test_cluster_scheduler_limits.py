"""A request that can never fit is a 400 at once, never a wait for room that will not come."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from coordinator.admission import Admission
from coordinator.cluster_scheduler import ClusterScheduler
from coordinator.registry import WorkerRegistry
from coordinator.request_timing import RequestTrace
from disagg.config import DispatchConfig
from disagg.engine.sampling_params import SamplingParams
from disagg.errors import InvalidRequestError
from disagg.rpc import control_pb2 as pb


class RefusingDecodeWorker:
    """Answers Allocate like a decode worker whose pool could never hold the request."""

    def __init__(self) -> None:
        self.num_calls = 0

    async def Allocate(self, request, timeout):
        self.num_calls += 1
        trailers = grpc.aio.Metadata(("disagg-param", "max_tokens"))
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), trailers, "needs 99 blocks"
        )


async def first_update(dispatcher: ClusterScheduler, prompt: list[int], max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens)
    async for _ in dispatcher.generate(prompt, params, RequestTrace("r")):
        return


def registry_with(info: pb.WorkerInfo) -> WorkerRegistry:
    registry = WorkerRegistry()
    registry.register(info)
    return registry


def test_a_request_larger_than_every_advertised_pool_is_refused_before_allocating():
    async def scenario() -> None:
        info = pb.WorkerInfo(
            worker_id="d", role="decode", address="127.0.0.1:1", total_kv_blocks=8, block_size=16
        )
        registry = registry_with(info)
        worker = RefusingDecodeWorker()
        registry.get("d").decode = worker
        dispatcher = ClusterScheduler(registry, Admission(queue_timeout_s=60), DispatchConfig())
        start = time.monotonic()
        with pytest.raises(InvalidRequestError) as error:
            await first_update(dispatcher, [5] * 100, max_tokens=100)
        assert error.value.param == "max_tokens" and "8" in error.value.message
        assert worker.num_calls == 0 and time.monotonic() - start < 5

    asyncio.run(scenario())


def test_a_worker_answering_invalid_argument_is_a_400_not_a_queue_timeout():
    async def scenario() -> None:
        info = pb.WorkerInfo(worker_id="d", role="decode", address="127.0.0.1:1")
        registry = registry_with(info)  # no limits advertised: the worker must say so
        worker = RefusingDecodeWorker()
        registry.get("d").decode = worker
        admission = Admission(queue_timeout_s=60)
        dispatcher = ClusterScheduler(registry, admission, DispatchConfig())
        start = time.monotonic()
        with pytest.raises(InvalidRequestError) as error:
            await first_update(dispatcher, [5] * 10, max_tokens=10)
        assert error.value.param == "max_tokens"
        assert worker.num_calls == 1 and admission.num_waiting == 0
        assert time.monotonic() - start < 5

    asyncio.run(scenario())


def test_vocabulary_and_context_limits_come_from_the_workers():
    async def scenario() -> None:
        info = pb.WorkerInfo(
            worker_id="d",
            role="decode",
            address="127.0.0.1:1",
            total_kv_blocks=1000,
            block_size=16,
            vocab_size=50,
            max_model_len=64,
        )
        dispatcher = ClusterScheduler(registry_with(info), Admission(), DispatchConfig())
        with pytest.raises(InvalidRequestError) as vocab:
            await first_update(dispatcher, [49, 50], max_tokens=4)
        assert vocab.value.param == "prompt"
        with pytest.raises(InvalidRequestError) as context:
            await first_update(dispatcher, [1] * 60, max_tokens=5)
        assert context.value.param == "max_tokens"

    asyncio.run(scenario())
