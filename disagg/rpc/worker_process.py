"""What every worker process does around its services: serve gRPC, register, shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from disagg import tracing
from disagg.ports import add_grpc_port, grpc_server
from disagg.rpc import control_pb2 as pb
from disagg.rpc.drain import DRAIN_SETTLE_S, DRAIN_TIMEOUT_S, drain
from disagg.rpc.health import ROLE_SERVICES, ServerHealth
from disagg.rpc.registration import WorkerRegistration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    coordinator: str = "127.0.0.1:50050"
    """host:port of the coordinator's control (registry) server."""
    host: str = "0.0.0.0"
    """Address the worker's gRPC server binds."""
    port: int = 0
    """gRPC port; 0 picks a free one, which is then advertised."""
    advertise_host: str = "127.0.0.1"
    """Host other machines use to reach this worker (gRPC and ZeroMQ)."""
    worker_id: str = ""
    """Unique name; defaults to role-hostname-pid."""
    threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""

    def __post_init__(self) -> None:
        if ":" not in self.coordinator:
            raise ValueError(f"coordinator must be HOST:PORT, got {self.coordinator!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")

    def resolved_id(self, role: str) -> str:
        return self.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}"


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
) -> None:
    """Serve until SIGTERM/SIGINT, then drain; `info.address` is filled in with the bound port.

    A second SIGTERM/SIGINT stops at once, whatever is still in flight.
    """
    tracing.setup(f"disagg-{info.role}-worker")
    server = grpc_server()
    add_services(server)
    health = ServerHealth(server, ROLE_SERVICES[info.role])
    await health.start()
    port = add_grpc_port(server, config.host, config.port, "--port")
    await server.start()
    info.address = f"{config.advertise_host}:{port}"
    info.pid = os.getpid()
    registration = WorkerRegistration(config.coordinator, info, status)
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
