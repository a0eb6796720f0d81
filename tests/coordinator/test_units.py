"""Coordinator parts that need no workers: the KV wait queue and the registry."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.admission import Admission, OverloadedError
from coordinator.registry import WorkerRegistry
from disagg.rpc import control_pb2 as pb


def test_admission_waits_for_room_then_admits():
    async def scenario() -> tuple[str, float]:
        admission = Admission(max_waiting=4, queue_timeout_s=10)
        room = {"free": False}

        async def try_admit() -> str | None:
            return "admitted" if room["free"] else None

        async def free_later() -> None:
            await asyncio.sleep(0)
            room["free"] = True
            admission.notify()

        waiter = asyncio.create_task(admission.admit(try_admit))
        await free_later()
        return await asyncio.wait_for(waiter, 5)

    result, waited_s = asyncio.run(scenario())
    assert result == "admitted" and waited_s >= 0


def test_admission_refuses_beyond_the_bound_and_times_out():
    async def scenario() -> None:
        admission = Admission(max_waiting=1, queue_timeout_s=0.2)

        async def never() -> None:
            return None

        first = asyncio.create_task(admission.admit(never))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError, match="already waiting"):
            await admission.admit(never)
        with pytest.raises(OverloadedError, match="no KV room"):
            await first
        assert admission.num_waiting == 0

    asyncio.run(scenario())


def test_registry_takes_silent_workers_out_of_rotation():
    async def scenario() -> None:
        registry = WorkerRegistry(heartbeat_interval_s=1.0, heartbeat_timeout_s=3.0)
        changes = []
        registry.on_change(lambda: changes.append(1))
        for worker_id, role in (("p", "prefill"), ("d", "decode"), ("c", "colocated")):
            info = pb.WorkerInfo(
                worker_id=worker_id, role=role, address="127.0.0.1:1", total_kv_blocks=8
            )
            registry.register(info)
        assert {w.worker_id for w in registry.healthy("prefill")} == {"p", "c"}
        assert {w.worker_id for w in registry.healthy("decode")} == {"d", "c"}
        assert registry.heartbeat(pb.HeartbeatRequest(worker_id="d", free_kv_blocks=5))
        assert not registry.heartbeat(pb.HeartbeatRequest(worker_id="ghost"))
        now = registry.get("d").last_seen_s
        registry.get("p").last_seen_s = now - 10
        assert registry.sweep(now_s=now) == ["p"]
        assert {w.worker_id for w in registry.healthy("prefill")} == {"c"}
        assert registry.get("d").free_kv_blocks == 5 and len(changes) == 4

    asyncio.run(scenario())


def test_a_handle_allocated_for_a_request_that_left_is_freed():
    """Cancelling the Allocate RPC does not undo it on the worker: the handle must be freed."""
    from coordinator.dispatcher import DispatchConfig, Dispatcher
    from disagg.engine.sampling_params import SamplingParams

    class SlowDecodeWorker:
        def __init__(self) -> None:
            self.called, self.release, self.freed = (
                asyncio.Event(),
                asyncio.Event(),
                asyncio.Event(),
            )
            self.freed_ids: list[str] = []

        async def Allocate(self, request, timeout):
            self.called.set()
            await self.release.wait()  # the worker finishes after the client has gone
            return pb.KVHandle(handle_id="h-1", block_ids=[0, 1])

        async def Free(self, request, timeout):
            self.freed_ids.append(request.handle_id)
            self.freed.set()
            return pb.FreeResponse(freed=True)

    async def scenario() -> list[str]:
        registry = WorkerRegistry()
        registry.register(
            pb.WorkerInfo(
                worker_id="d",
                role="decode",
                address="127.0.0.1:1",
                total_kv_blocks=8,
                block_size=16,
            )
        )
        worker = SlowDecodeWorker()
        registry.get("d").decode = worker
        dispatcher = Dispatcher(registry, Admission(), DispatchConfig())
        request = asyncio.create_task(
            dispatcher._allocate("r", [1, 2, 3], SamplingParams(max_tokens=4))
        )
        await asyncio.wait_for(worker.called.wait(), 5)
        request.cancel()
        worker.release.set()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.wait_for(worker.freed.wait(), 5)
        return worker.freed_ids

    assert asyncio.run(scenario()) == ["h-1"]
