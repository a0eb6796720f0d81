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


async def queued(admission: Admission, num_waiting: int) -> None:
    """Until `num_waiting` requests wait in line (the loop runs nothing else meanwhile)."""
    for _ in range(1000):
        if admission.num_waiting == num_waiting:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{admission.num_waiting} waiting, expected {num_waiting}")


def test_a_notify_during_a_failed_try_is_not_lost():
    """Room that appears while a waiter is trying must wake it again, not a heartbeat later."""

    async def scenario() -> str:
        admission = Admission(max_waiting=4, queue_timeout_s=30)
        calls = {"n": 0}

        async def try_admit() -> str | None:
            calls["n"] += 1
            if calls["n"] == 2:  # this try saw no room, but room appears meanwhile
                await asyncio.sleep(0)
                admission.notify()
                return None
            return "admitted" if calls["n"] >= 3 else None

        waiter = asyncio.create_task(admission.admit(try_admit))
        await queued(admission, 1)
        admission.notify()
        result, _ = await asyncio.wait_for(waiter, 2)
        return result

    assert asyncio.run(scenario()) == "admitted"


def test_admission_serves_waiters_in_arrival_order():
    """A new arrival must not take the room the head of the line was woken for."""

    async def scenario() -> list[str]:
        admission = Admission(max_waiting=4, queue_timeout_s=30)
        room = {"slots": 0}
        order: list[str] = []

        def taker(name: str):
            async def try_admit() -> str | None:
                if room["slots"] <= 0:
                    return None
                room["slots"] -= 1
                order.append(name)
                return name

            return try_admit

        def free_one() -> None:
            room["slots"] += 1
            admission.notify()

        first = asyncio.create_task(admission.admit(taker("first")))
        await queued(admission, 1)
        second = asyncio.create_task(admission.admit(taker("second")))
        await queued(admission, 2)
        room["slots"] = 1  # room appears just as a third request arrives
        late = asyncio.create_task(admission.admit(taker("late")))
        await asyncio.sleep(0)
        admission.notify()
        await asyncio.wait_for(first, 2)
        free_one()
        await asyncio.wait_for(second, 2)
        free_one()
        await asyncio.wait_for(late, 2)
        assert admission.num_waiting == 0
        return order

    assert asyncio.run(scenario()) == ["first", "second", "late"]


def test_admission_timeout_is_caught_as_python_3_10_raises_it(monkeypatch):
    """On 3.10 `asyncio.wait_for` raises asyncio.TimeoutError, not the builtin TimeoutError."""

    class Py310TimeoutError(Exception):
        pass

    async def wait_for_310(awaitable, timeout):
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            raise Py310TimeoutError()
        return task.result()

    monkeypatch.setattr(asyncio, "TimeoutError", Py310TimeoutError)
    monkeypatch.setattr(asyncio, "wait_for", wait_for_310)

    async def scenario() -> None:
        admission = Admission(max_waiting=1, queue_timeout_s=0.1)

        async def never() -> None:
            return None

        with pytest.raises(OverloadedError, match="no KV room"):
            await admission.admit(never)

    asyncio.run(scenario())


def test_given_back_blocks_count_as_free_before_the_next_heartbeat():
    """The registry owns the estimate: blocks given back make room (and wake waiters) now."""

    async def scenario() -> None:
        registry = WorkerRegistry()
        woken = []
        registry.on_change(lambda: woken.append(1))
        info = pb.WorkerInfo(
            worker_id="d", role="decode", address="127.0.0.1:1", total_kv_blocks=8, block_size=16
        )
        registry.register(info)
        worker = registry.get("d")
        assert registry.reserve_blocks(worker, 100) == 7 and worker.free_blocks_estimate == 1
        registry.heartbeat(pb.HeartbeatRequest(worker_id="d", free_kv_blocks=1))
        assert worker.free_blocks_estimate == 1
        num_woken = len(woken)
        registry.release_blocks(worker, 7)
        assert worker.free_blocks_estimate == 8 and len(woken) == num_woken + 1

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
    from coordinator.cluster_scheduler import ClusterScheduler, DispatchConfig
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
        scheduler = ClusterScheduler(registry, Admission(), DispatchConfig(disagg_policy="always"))
        request = asyncio.create_task(
            scheduler._allocate("r", [1, 2, 3], SamplingParams(max_tokens=4))
        )
        await asyncio.wait_for(worker.called.wait(), 5)
        request.cancel()
        worker.release.set()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.wait_for(worker.freed.wait(), 5)
        return worker.freed_ids

    assert asyncio.run(scenario()) == ["h-1"]


def test_a_failed_prefill_frees_its_handle_once_and_counts_its_blocks_back_once():
    import grpc

    from coordinator.cluster_scheduler import ClusterScheduler, DispatchConfig
    from coordinator.errors import WorkerError
    from coordinator.request_timing import RequestTrace
    from disagg.engine.sampling_params import SamplingParams

    class DecodeWorker:
        def __init__(self) -> None:
            self.freed_ids: list[str] = []

        async def Allocate(self, request, timeout):
            return pb.KVHandle(handle_id="h-1", block_ids=[0, 1])

        async def Free(self, request, timeout):
            self.freed_ids.append(request.handle_id)
            return pb.FreeResponse(freed=True)

    class FailingPrefillWorker:
        async def Prefill(self, request, timeout):
            metadata = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, metadata, metadata, "gone")

    async def scenario() -> tuple[list[str], int]:
        registry = WorkerRegistry()
        for worker_id, role in (("d", "decode"), ("p", "prefill")):
            info = pb.WorkerInfo(
                worker_id=worker_id, role=role, address="127.0.0.1:1", total_kv_blocks=8,
                block_size=16,
            )  # fmt: skip
            registry.register(info)
        decode = DecodeWorker()
        registry.get("d").decode = decode
        registry.get("p").prefill = FailingPrefillWorker()
        scheduler = ClusterScheduler(
            registry, Admission(), DispatchConfig(disagg_policy="always", max_migrations=0)
        )
        tokens = scheduler.generate([1, 2, 3], SamplingParams(max_tokens=4), RequestTrace("r"))
        with pytest.raises(WorkerError, match="gone"):
            await anext(tokens)
        for _ in range(1000):  # the Free goes out from a task of its own
            if decode.freed_ids:
                break
            await asyncio.sleep(0)
        await asyncio.gather(*scheduler._cleanups)
        return decode.freed_ids, registry.get("d").free_blocks_estimate

    assert asyncio.run(scenario()) == (["h-1"], 8)
