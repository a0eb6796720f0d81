"""The coordinator process: HTTP front door, worker registry, dispatch."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import uvicorn

from coordinator import kserve_grpc
from coordinator.admission import Admission
from coordinator.app import build_app
from coordinator.dispatcher import Dispatcher
from coordinator.frontend import Frontend
from coordinator.generation import Generator
from coordinator.metrics import Metrics
from coordinator.registry import RegistryService, WorkerRegistry
from disagg.config import CoordinatorConfig, DispatchConfig
from disagg.model.loader import load_model_info
from disagg.rpc import control_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def enable_request_log() -> None:
    """One JSON line per request on stderr, whatever the general log level."""
    request_log = logging.getLogger("disagg.requests")
    if not request_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False


async def run(config: CoordinatorConfig, dispatch: DispatchConfig | None = None) -> None:
    enable_request_log()
    model = load_model_info(config.model)
    served_name = config.served_model_name or model.name
    registry = WorkerRegistry(config.heartbeat_interval_s, config.heartbeat_timeout_s)
    admission = Admission(config.max_waiting, config.queue_timeout_s)
    registry.on_change(admission.notify)
    dispatcher = Dispatcher(registry, admission, dispatch or DispatchConfig())
    metrics = Metrics(served_name)
    frontend = Frontend(
        Generator(dispatcher, model, metrics), model, served_name, registry, admission, metrics
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


def main(config: CoordinatorConfig, dispatch: DispatchConfig | None = None) -> int:
    asyncio.run(run(config, dispatch))
    return 0
