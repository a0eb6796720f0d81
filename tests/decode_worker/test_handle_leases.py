"""Handle leases end to end over the real control plane: a coordinator's registry answers a
decode worker's heartbeats with the handles it holds, and the worker frees the rest once
their lease runs out (the coordinator died, or forgot the request)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from coordinator.registry import RegistryService, WorkerRegistry
from disagg.engine.sampling_params import SamplingParams
from disagg.ports import add_grpc_port, grpc_server
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.registration import WorkerRegistration
from tests.worker_harness import decode_side

HEARTBEAT_S = 0.1
LEASE_S = 0.5
PARAMS = SamplingParams(temperature=0, max_tokens=4)


async def wait_for(predicate, timeout_s: float) -> float:
    """Seconds until `predicate()` held (polled), or an assertion after `timeout_s`."""
    start_s = time.monotonic()
    while not predicate():
        assert time.monotonic() - start_s < timeout_s, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start_s


def test_held_handles_are_renewed_by_heartbeats_and_the_rest_freed_within_the_lease(
    tmp_path: Path,
):
    async def scenario() -> None:
        registry = WorkerRegistry(heartbeat_interval_s=HEARTBEAT_S, heartbeat_timeout_s=5.0)
        registry.set_handle_lease(LEASE_S)
        control = grpc_server()
        pb_grpc.add_RegistryServicer_to_server(RegistryService(registry, "m"), control)
        port = add_grpc_port(control, "127.0.0.1", 0, "--control-port")
        await control.start()
        async with decode_side(tmp_path, colocated=True, worker_id="decode-0-e1") as decode:
            table = decode.table
            info = pb.WorkerInfo(
                worker_id="decode-0-e1", role="decode", model="m", address="127.0.0.1:1"
            )
            status = lambda: pb.HeartbeatRequest(worker_id="decode-0-e1")  # noqa: E731
            renew = lambda reply: table.renew(list(reply.leased_handle_ids), reply.lease_s)  # noqa: E731
            registration = WorkerRegistration(f"127.0.0.1:{port}", info, status, on_reply=renew)
            await registration.start()
            sweeper = asyncio.create_task(decode.service.expire_leases(0.05))
            await wait_for(lambda: registry.get("decode-0-e1") is not None, 10.0)
            live = await decode.allocate([3, 4, 5], PARAMS, lease_s=registry.lease_s)
            abandoned = await decode.allocate([6, 7, 8], PARAMS, lease_s=registry.lease_s)
            registry.hold_handle(registry.get("decode-0-e1"), live.handle_id)

            freed_after_s = await wait_for(lambda: table.get(abandoned.handle_id) is None, 5.0)
            assert freed_after_s < LEASE_S + 0.5
            assert table.end_reason(abandoned.handle_id) == "lease_expired"
            await asyncio.sleep(4 * LEASE_S)
            assert table.get(live.handle_id) is not None, "renewed by every heartbeat"

            registry.let_go_handle(registry.get("decode-0-e1"), live.handle_id)
            await wait_for(lambda: table.get(live.handle_id) is None, LEASE_S + 1.0)
            assert decode.is_idle()
            sweeper.cancel()
            await registration.stop()
        await control.stop(grace=None)

    asyncio.run(scenario())
