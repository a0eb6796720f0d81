"""grpc.health.v1 on the worker and coordinator servers follows their real readiness."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.local_cluster import free_port, get_json
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.health import INFERENCE_SERVICE, REGISTRY_SERVICE, ROLE_SERVICES
from disagg.rpc.worker_process import WorkerConfig, serve_worker

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEADLINE_S = 20.0


class FakeRegistry(pb_grpc.RegistryServicer):
    """A coordinator's registry whose answers the test decides."""

    def __init__(self) -> None:
        self.can_register = asyncio.Event()
        self.knows_workers = True

    async def Register(self, request, context):
        await self.can_register.wait()
        return pb.RegisterResponse(heartbeat_interval_s=0.1)

    async def Heartbeat(self, request, context):
        return pb.HeartbeatResponse(known=self.knows_workers)


async def check(stub, service: str = "") -> int:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def eventually(stub, status: int, service: str = "") -> None:
    deadline = time.monotonic() + DEADLINE_S
    while await check(stub, service) != status:
        assert time.monotonic() < deadline, f"{service!r} never became {status}"
        await asyncio.sleep(0.05)


async def worker_scenario() -> None:
    registry = FakeRegistry()
    coordinator = grpc.aio.server()
    pb_grpc.add_RegistryServicer_to_server(registry, coordinator)
    control_port = coordinator.add_insecure_port("127.0.0.1:0")
    await coordinator.start()
    config = WorkerConfig(coordinator=f"127.0.0.1:{control_port}", host="127.0.0.1")
    info = pb.WorkerInfo(worker_id="prefill-test", role="prefill", model="m")
    stopped = asyncio.Event()
    status = lambda: pb.HeartbeatRequest(worker_id="prefill-test")  # noqa: E731
    worker = asyncio.create_task(
        serve_worker(config, info, lambda server: None, status, stopped.set)
    )
    deadline = time.monotonic() + DEADLINE_S
    while not info.address:
        assert time.monotonic() < deadline and not worker.done(), "the worker never served"
        await asyncio.sleep(0.01)
    async with grpc.aio.insecure_channel(info.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        (liveness,) = ROLE_SERVICES["prefill"]
        assert await check(stub, liveness) == SERVING, "alive as soon as it serves"
        assert await check(stub) == NOT_SERVING, "not ready before the coordinator knows it"
        try:
            await check(stub, "no.such.Service")
            raise AssertionError("an unknown service must be NOT_FOUND")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND

        registry.can_register.set()
        await eventually(stub, SERVING)

        registry.can_register.clear()  # forgotten, and cannot register again yet
        registry.knows_workers = False
        await eventually(stub, NOT_SERVING)
        assert await check(stub, liveness) == SERVING, "a lost coordinator is no reason to restart"
        registry.knows_workers = True
        registry.can_register.set()
        await eventually(stub, SERVING)

        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        # serve_worker's handler takes it; without one, SIGTERM would end the test run
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        assert (await watch.read()).status == NOT_SERVING, "stopping is announced first"
        watch.cancel()
    await asyncio.wait_for(worker, DEADLINE_S)
    assert stopped.is_set()
    await coordinator.stop(None)


def test_worker_health_follows_registration_and_stopping():
    asyncio.run(worker_scenario())


def worker_info(role: str, model: str) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=f"{role}-0", role=role, model=model, address="127.0.0.1:1",
        total_kv_blocks=8, block_size=16, vocab_size=49152, max_model_len=8192,
    )  # fmt: skip


async def coordinator_scenario(grpc_port: int, control_port: int, model: str) -> None:
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as inference,
        grpc.aio.insecure_channel(f"127.0.0.1:{control_port}") as control,
    ):
        health = health_pb2_grpc.HealthStub(inference)
        assert await check(health, INFERENCE_SERVICE) == SERVING
        assert await check(health) == NOT_SERVING, "no workers yet"
        control_health = health_pb2_grpc.HealthStub(control)
        assert await check(control_health) == SERVING, "registration must be open from the start"
        assert await check(control_health, REGISTRY_SERVICE) == SERVING

        registry = pb_grpc.RegistryStub(control)
        await registry.Register(worker_info("prefill", model), timeout=5)
        await asyncio.sleep(0.5)  # two readiness polls: a prefill worker alone is not enough
        assert await check(health) == NOT_SERVING
        await registry.Register(worker_info("decode", model), timeout=5)
        await eventually(health, SERVING)
        # No heartbeats follow: the coordinator drops both, and is no longer ready.
        await eventually(health, NOT_SERVING)


@pytest.mark.slow  # several seconds: the full suite runs it
def test_coordinator_health_is_ready_only_with_a_worker_for_each_phase():
    http_port, grpc_port, control_port = free_port(), free_port(), free_port()
    command = [
        sys.executable, "-m", "launcher.cli", "coordinator", "--host", "127.0.0.1",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--control-port", str(control_port), "--heartbeat-timeout", "2",
    ]  # fmt: skip
    process = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "the coordinator exited"
            try:
                models = get_json(f"http://127.0.0.1:{http_port}/v1/models")
                break
            except OSError:
                assert time.monotonic() < deadline, "the coordinator never came up"
                time.sleep(0.2)
        model = models["data"][0]["id"]
        asyncio.run(coordinator_scenario(grpc_port, control_port, model))
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
