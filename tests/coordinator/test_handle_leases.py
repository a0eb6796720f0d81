"""The coordinator's side of KV handle leases: a request's handle is listed in its decode
worker's heartbeat replies (which renews the lease there) exactly while the request holds it."""

from __future__ import annotations

import asyncio

from coordinator.request_timing import RequestTrace
from disagg.engine.sampling_params import SamplingParams
from disagg.rpc import control_pb2 as pb
from tests.coordinator.fake_workers import FakeWorker, fake_cluster


def leased(scheduler, worker_id: str) -> list[str]:
    reply = scheduler.registry.heartbeat_reply(pb.HeartbeatRequest(worker_id=worker_id))
    assert reply.known
    return list(reply.leased_handle_ids)


def test_heartbeat_replies_renew_a_handle_while_its_request_runs_and_not_after():
    decode = FakeWorker("d0")

    async def scenario() -> tuple[list[list[str]], list[str]]:
        scheduler = fake_cluster([decode], [FakeWorker("p0")])
        during = []
        params = SamplingParams(temperature=0, max_tokens=8)
        async for _ in scheduler.generate([5, 6, 7], params, RequestTrace("r")):
            during.append(leased(scheduler, "d0"))
        return during, leased(scheduler, "d0")

    during, after = asyncio.run(scenario())
    assert all(ids == ["d0-h1"] for ids in during)
    assert after == []


def test_a_request_closed_early_stops_renewing_its_handle():
    async def scenario() -> list[str]:
        scheduler = fake_cluster([FakeWorker("d0")], [FakeWorker("p0")])
        params = SamplingParams(temperature=0, max_tokens=50)
        updates = scheduler.generate([5, 6, 7], params, RequestTrace("r"))
        await anext(updates)
        assert leased(scheduler, "d0") == ["d0-h1"]
        await updates.aclose()  # the client left
        return leased(scheduler, "d0")

    assert asyncio.run(scenario()) == []


def test_an_unknown_worker_is_told_to_register_and_renews_nothing():
    async def scenario() -> pb.HeartbeatResponse:
        scheduler = fake_cluster([FakeWorker("d0")], [])
        return scheduler.registry.heartbeat_reply(pb.HeartbeatRequest(worker_id="d0-e1"))

    reply = asyncio.run(scenario())
    assert not reply.known and list(reply.leased_handle_ids) == []


def test_the_lease_spans_at_least_three_heartbeats_and_is_granted_at_allocation():
    decode = FakeWorker("d0")

    async def scenario():
        scheduler = fake_cluster([decode], [FakeWorker("p0")], handle_lease_s=2.0)
        assert scheduler.registry.lease_s == 3.0  # the fake registry beats every second
        params = SamplingParams(temperature=0, max_tokens=2)
        [u async for u in scheduler.generate([5, 6], params, RequestTrace("r"))]
        return scheduler

    asyncio.run(scenario())
    assert decode.allocations[0].lease_s == 3.0
