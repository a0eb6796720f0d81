"""TBT gaps come from one clock: a decode worker's skewed clock cannot distort the first gap."""

from __future__ import annotations

import asyncio
import time

from coordinator.admission import Admission
from coordinator.cluster_scheduler import ClusterScheduler
from coordinator.registry import WorkerRegistry
from coordinator.request_timing import RequestTrace
from disagg.config import DispatchConfig
from disagg.engine.sampling_params import SamplingParams
from disagg.rpc import control_pb2 as pb

SKEW_S = 1000.0  # the decode worker's clock runs this far ahead of ours
GAP_S = 0.02


class Stream:
    def __init__(self, events: list[pb.TokenEvent]) -> None:
        self.events = events

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for event in self.events:
            await asyncio.sleep(GAP_S)
            yield event

    def cancel(self) -> None:
        pass


class FakeWorker:
    """A colocated worker: Allocate, Prefill and Decode, with a clock SKEW_S ahead."""

    def __init__(self) -> None:
        self.decode_requests: list[pb.DecodeRequest] = []

    async def Allocate(self, request, timeout):
        return pb.KVHandle(handle_id="h", block_ids=[0])

    async def Prefill(self, request, timeout):
        return pb.PrefillResponse(first_token_id=7, queue_s=0.25)

    def Decode(self, request, timeout):
        self.decode_requests.append(request)
        start = time.time() + SKEW_S
        return Stream(
            [
                pb.TokenEvent(token_id=8, time_unix_s=start),
                pb.TokenEvent(token_id=9, time_unix_s=start + GAP_S, finish_reason="length"),
            ]
        )


def test_decode_times_are_moved_onto_the_coordinators_clock():
    async def scenario() -> tuple[RequestTrace, FakeWorker]:
        registry = WorkerRegistry()
        info = pb.WorkerInfo(worker_id="c", role="colocated", address="127.0.0.1:1")
        registry.register(info)
        worker = FakeWorker()
        registry.get("c").decode = registry.get("c").prefill = worker
        dispatcher = ClusterScheduler(registry, Admission(), DispatchConfig())
        trace = RequestTrace("r")
        params = SamplingParams(temperature=0, max_tokens=3)
        tokens = [u.token_id async for u in dispatcher.generate([1, 2, 3], params, trace)]
        assert tokens == [7, 8, 9]
        return trace, worker

    trace, worker = asyncio.run(scenario())
    first_gap, second_gap = trace.tbt_s
    assert 0 < first_gap < 1.0, "the first gap must not mix two machines' clocks"
    assert abs(second_gap - GAP_S) < 1e-6  # later gaps: the decode worker's own differences
    assert trace.prefill_queue_s == 0.25  # prefill-side queueing reaches the trace
    request = worker.decode_requests[0]
    assert (request.handle_id, request.first_token_id) == ("h", 7)
