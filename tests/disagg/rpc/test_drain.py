"""SIGTERM's drain: leave the rotation at once, wait for in-flight work, give up when told."""

from __future__ import annotations

import asyncio

import pytest

from disagg.rpc import control_pb2 as pb
from disagg.rpc.drain import drain, is_idle


class FakeRegistration:
    def __init__(self, is_reachable: bool = True) -> None:
        self.info = pb.WorkerInfo(worker_id="decode-0-e1")
        self.is_reachable = is_reachable
        self.is_draining = False

    async def leave_rotation(self) -> bool:
        self.is_draining = True
        return self.is_reachable


class Work:
    """In-flight sequences that finish one by one as the test says."""

    def __init__(self, load: int) -> None:
        self.load = load

    def status(self) -> pb.HeartbeatRequest:
        return pb.HeartbeatRequest(worker_id="decode-0-e1", load=self.load)


def test_idle_means_nothing_in_flight():
    assert is_idle(pb.HeartbeatRequest())
    assert not is_idle(pb.HeartbeatRequest(load=1))


@pytest.mark.parametrize("is_reachable", [True, False])
def test_drain_leaves_the_rotation_first_then_waits_for_the_last_sequence(is_reachable):
    async def scenario() -> None:
        registration, work = FakeRegistration(is_reachable), Work(load=2)
        task = asyncio.create_task(drain(registration, work.status, 0.0, 30.0, asyncio.Event()))
        await asyncio.sleep(0.2)
        assert registration.is_draining and not task.done()
        work.load = 1
        await asyncio.sleep(0.2)
        assert not task.done()
        work.load = 0
        assert await asyncio.wait_for(task, 5.0) is True

    asyncio.run(scenario())


def test_drain_waits_out_the_settle_time_even_when_idle():
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        start_s = loop.time()
        assert await drain(FakeRegistration(), Work(0).status, 0.3, 30.0, asyncio.Event())
        return loop.time() - start_s

    assert asyncio.run(scenario()) >= 0.3


def test_a_second_signal_or_the_timeout_cuts_the_drain_short():
    async def scenario() -> None:
        cut_short = asyncio.Event()
        task = asyncio.create_task(drain(FakeRegistration(), Work(4).status, 0.0, 30.0, cut_short))
        await asyncio.sleep(0.1)
        cut_short.set()
        assert await asyncio.wait_for(task, 5.0) is False
        timed_out = drain(FakeRegistration(), Work(4).status, 0.0, 0.2, asyncio.Event())
        assert await asyncio.wait_for(timed_out, 5.0) is False

    asyncio.run(scenario())
