"""A draining worker stays registered (its streams go on) but gets no new work."""

from __future__ import annotations

import asyncio

from coordinator.registry import WorkerRegistry
from disagg.rpc import control_pb2 as pb


def test_a_draining_worker_leaves_the_rotation_and_comes_back_when_it_stops_draining():
    async def scenario() -> None:
        registry = WorkerRegistry()
        for worker_id, role in (("d0", "decode"), ("d1", "decode"), ("c", "colocated")):
            registry.register(pb.WorkerInfo(worker_id=worker_id, role=role, address="h:1", pid=9))
        assert registry.heartbeat(pb.HeartbeatRequest(worker_id="d0", load=3, draining=True))
        assert registry.heartbeat(pb.HeartbeatRequest(worker_id="c", draining=True))
        assert {w.worker_id for w in registry.healthy("decode")} == {"d1"}
        assert registry.healthy("prefill") == []
        assert {w.worker_id for w in registry.all()} == {"d0", "d1", "c"}, "still listed"
        assert registry.get("d0").is_draining and registry.get("d0").load == 3
        assert registry.get("d0").info.pid == 9
        assert registry.heartbeat(pb.HeartbeatRequest(worker_id="d0"))
        assert {w.worker_id for w in registry.healthy("decode")} == {"d0", "d1"}

    asyncio.run(scenario())
