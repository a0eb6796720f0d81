"""The coordinator process: HTTP and gRPC front doors, worker registry, cluster scheduler."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
import uvicorn

from coordinator import kserve_grpc
from coordinator.admission import Admission
from coordinator.app import build_app
from coordinator.cluster_scheduler import ClusterScheduler, DispatchConfig
from coordinator.frontend import Frontend
from coordinator.generation import Generator
from coordinator.metrics import Metrics
from coordinator.registry import RegistryService, WorkerRegistry
from disagg.model.loader import load_model_info
from disagg.rpc import control_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoordinatorConfig:
    model: str = "default"
    """Model whose tokenizer and limits the front door uses; workers must serve the same."""
    served_model_name: str = ""
    """Name clients use in `model`; defaults to the model's own name."""
    host: str = "0.0.0.0"
    """Address the HTTP and control servers bind."""
    http_port: int = 8000
    """OpenAI and KServe REST."""
    grpc_port: int = 8001
    """KServe V2 gRPC (inference.GRPCInferenceService)."""
    control_port: int = 50050
    """Worker registry (Register, Heartbeat)."""
    heartbeat_interval_s: float = 1.0
    """How often workers report."""
    heartbeat_timeout_s: float = 3.0
    """A worker silent this long is out of rotation."""
    max_waiting: int = 256
    """Requests that may wait for KV room before new ones are refused."""
    queue_timeout_s: float = 30.0
    """Longest wait for KV room."""

    def __post_init__(self) -> None:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must exceed heartbeat_interval_s")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")


def enable_request_log() -> None:
    """One JSON line per request on stderr, whatever the general log level."""
    request_log = logging.getLogger("disagg.requests")
    if not request_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False


async def run(config: CoordinatorConfig) -> None:
    enable_request_log()
    model = load_model_info(config.model)
    served_name = config.served_model_name or model.name
    registry = WorkerRegistry(config.heartbeat_interval_s, config.heartbeat_timeout_s)
    admission = Admission(config.max_waiting, config.queue_timeout_s)
    registry.on_change(admission.notify)
    scheduler = ClusterScheduler(registry, admission, DispatchConfig())
    metrics = Metrics(served_name)
    frontend = Frontend(
        Generator(scheduler, model, metrics), model, served_name, registry, admission, metrics
    )

    control = grpc.aio.server()
    pb_grpc.add_RegistryServicer_to_server(RegistryService(registry, model.name), control)
    control.add_insecure_port(f"{config.host}:{config.control_port}")
    await control.start()
    inference = grpc.aio.server()
    kserve_grpc.add_to_server(inference, frontend)
    inference.add_insecure_port(f"{config.host}:{config.grpc_port}")
    await inference.start()

    app = build_app(frontend)
    http = uvicorn.Server(
        uvicorn.Config(
            app, host=config.host, port=config.http_port, log_level="warning", lifespan="off"
        )
    )
    http.install_signal_handlers = lambda: None  # we handle signals for both servers
    sweeper = asyncio.create_task(registry.run_sweeper())
    serving = asyncio.create_task(http.serve())
    print(
        f"disagg coordinator: HTTP on {config.host}:{config.http_port}, KServe gRPC on "
        f"{config.host}:{config.grpc_port}, control on {config.host}:{config.control_port}, "
        f"model {served_name}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await asyncio.wait(
        [serving, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    http.should_exit = True
    await serving
    sweeper.cancel()
    await inference.stop(grace=1.0)
    await control.stop(grace=1.0)


def main(config: CoordinatorConfig) -> int:
    asyncio.run(run(config))
    return 0
