"""What every worker process does around its services: serve gRPC, register, shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

import grpc
import torch

from disagg import tracing
from disagg.config import WorkerConfig
from disagg.engine.llm_engine import LLMEngine
from disagg.ports import add_grpc_port, grpc_server
from disagg.rpc import control_pb2 as pb
from disagg.rpc.cluster_secret import server_interceptors
from disagg.rpc.drain import DRAIN_SETTLE_S, DRAIN_TIMEOUT_S, drain
from disagg.rpc.health import ROLE_SERVICES, ServerHealth
from disagg.rpc.registration import WorkerRegistration
from disagg.rpc.worker_epoch import EpochInterceptor

log = logging.getLogger(__name__)


def resolved_id(config: WorkerConfig, role: str) -> str:
    """The configured worker id, or role-hostname-pid."""
    return config.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}"


def worker_info(engine: LLMEngine, role: str, worker_id: str) -> pb.WorkerInfo:
    """Who the worker is and the limits every request must fit (the address comes later)."""
    return pb.WorkerInfo(
        worker_id=worker_id,
        role=role,
        model=engine.loaded.name,
        total_kv_blocks=engine.block_manager.num_blocks,
        block_size=engine.block_manager.block_size,
        vocab_size=engine.vocab_size,
        max_model_len=engine.max_model_len,
    )


def apply_threads(config: WorkerConfig) -> None:
    if config.threads > 0:
        torch.set_num_threads(config.threads)


def watch_parent() -> None:
    """Exit when the launching `disagg serve` dies, so a killed launcher leaves no orphans."""
    parent = os.environ.get("DISAGG_PARENT_PID")
    if not parent:
        return

    def watch() -> None:
        while True:
            if os.getppid() != int(parent):
                os._exit(0)
            threading.Event().wait(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


async def serve_worker(
    config: WorkerConfig,
    info: pb.WorkerInfo,
    add_services: Callable[[grpc.aio.Server], None],
    status: Callable[[], pb.HeartbeatRequest],
    on_stop: Callable[[], None],
    on_heartbeat_reply: Callable[[pb.HeartbeatResponse], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain; `info.address` is filled in with the bound port.

    A second SIGTERM/SIGINT stops at once, whatever is still in flight. Calls addressed to
    another incarnation of this worker are refused (disagg/rpc/worker_epoch.py).
    """
    tracing.setup(f"disagg-{info.role}-worker")
    # NOTE: Allocate, Prefill, Decode and Free answer only the cluster's own coordinator,
    # and only calls meant for this incarnation of the worker.
    server = grpc_server(
        [*(server_interceptors(config.cluster_secret) or []), EpochInterceptor(info.worker_id)]
    )
    add_services(server)
    health = ServerHealth(server, ROLE_SERVICES[info.role])
    await health.start()
    port = add_grpc_port(server, config.host, config.port, "--port")
    await server.start()
    info.address = f"{config.advertise_host}:{port}"
    info.pid = os.getpid()
    registration = WorkerRegistration(
        config.coordinator, info, status, config.cluster_secret, on_heartbeat_reply
    )
    health.follow(lambda: registration.is_registered)
    await registration.start()
    print(f"disagg {info.role} worker {info.worker_id} serving gRPC on {info.address}", flush=True)
    stop, cut_short = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: (cut_short if stop.is_set() else stop).set())
    await stop.wait()
    log.info("draining %s", info.worker_id)
    await health.stop()  # NOTE: a draining worker is not ready: probes and balancers look elsewhere
    await drain(registration, status, DRAIN_SETTLE_S, DRAIN_TIMEOUT_S, cut_short)
    await registration.stop()
    await server.stop(grace=1.0)
    on_stop()
