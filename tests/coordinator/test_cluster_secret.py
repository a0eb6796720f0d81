"""The cluster secret on the coordinator's control server: a rogue process without it (or with a
wrong one) cannot register or heartbeat; a worker's registration that carries it joins; health
checks stay open. Plus `disagg serve` handing its children a fresh secret by environment."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.registry import RegistryService, WorkerRegistry
from disagg.config import CoordinatorConfig
from disagg.ports import add_grpc_port, grpc_server
from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.cluster_secret import ClusterSecretInterceptor, secret_metadata
from disagg.rpc.health import REGISTRY_SERVICE, ServerHealth
from disagg.rpc.registration import WorkerRegistration
from launcher.options import config_to_args
from launcher.serve import SECRET_FIELDS, secret_env

SECRET = "s3cret"
MODEL = "m"


def worker_info(worker_id: str) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=worker_id, role="decode", model=MODEL, address="127.0.0.1:1", total_kv_blocks=8
    )


async def _control_plane_checks() -> None:
    registry = WorkerRegistry()
    server = grpc_server([ClusterSecretInterceptor(SECRET)])
    pb_grpc.add_RegistryServicer_to_server(RegistryService(registry, MODEL), server)
    health = ServerHealth(server, [REGISTRY_SERVICE])
    await health.start()
    port = add_grpc_port(server, "127.0.0.1", 0, "--control-port")
    await server.start()
    health.follow(lambda: True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RegistryStub(channel)
            for metadata in ((), secret_metadata("wrong"), secret_metadata(SECRET + "x")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Register(worker_info("rogue"), metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Heartbeat(pb.HeartbeatRequest(worker_id="rogue"), metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert registry.all() == []
            probe = health_pb2_grpc.HealthStub(channel)
            reply = await probe.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING  # probes stay open

        registration = WorkerRegistration(
            f"127.0.0.1:{port}", worker_info("decode-0"), lambda: pb.HeartbeatRequest(), SECRET
        )
        await registration.start()
        try:
            for _ in range(100):
                if registration.is_registered:
                    break
                await asyncio.sleep(0.05)
            assert registration.is_registered
            assert [w.worker_id for w in registry.all()] == ["decode-0"]
        finally:
            await registration.stop()
    finally:
        await health.stop()
        await server.stop(grace=None)


def test_only_holders_of_the_secret_join_the_cluster():
    asyncio.run(_control_plane_checks())


def test_serve_gives_children_a_secret_by_environment_not_argv():
    config = CoordinatorConfig(api_key=("k1", "k2"))
    env = secret_env(config)
    assert len(env["DISAGG_CLUSTER_SECRET"]) == 64 and env["DISAGG_API_KEY"] == "k1,k2"
    assert secret_env(config)["DISAGG_CLUSTER_SECRET"] != env["DISAGG_CLUSTER_SECRET"]
    given = CoordinatorConfig(cluster_secret="mine")
    assert secret_env(given) == {"DISAGG_CLUSTER_SECRET": "mine"}
    argv = config_to_args(CoordinatorConfig(cluster_secret="mine", api_key=("k",)), SECRET_FIELDS)
    assert "mine" not in argv and "k" not in argv
