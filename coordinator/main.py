"""The coordinator process: HTTP and gRPC front doors, worker registry, cluster scheduler."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from coordinator import kserve_grpc
from coordinator.admission import Admission
from coordinator.app import build_app
from coordinator.auth import ApiKeys
from coordinator.cluster_scheduler import ClusterScheduler
from coordinator.frontend import Frontend
from coordinator.generation import Generator
from coordinator.metrics import Metrics
from coordinator.quotas import TenantQuotas
from coordinator.registry import RegistryService, WorkerRegistry
from coordinator.tls import TlsFiles
from disagg import tracing
from disagg.config import CoordinatorConfig, DispatchConfig
from disagg.model.loader import load_model_info
from disagg.ports import add_grpc_port, bind_tcp, grpc_server
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.cluster_secret import server_interceptors
from disagg.rpc.health import INFERENCE_SERVICE, REGISTRY_SERVICE, ServerHealth

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
    tracing.setup("disagg-coordinator")
    # NOTE: every port is taken before the model loads, so a second cluster fails at once.
    tls = TlsFiles.from_config(config)  # unreadable files fail before any port is taken
    http_socket = bind_tcp(config.host, config.http_port, "--http-port")
    control = grpc_server(server_interceptors(config.cluster_secret))
    add_grpc_port(control, config.host, config.control_port, "--control-port")
    inference = grpc_server()
    credentials = tls.grpc_credentials() if tls else None
    add_grpc_port(inference, config.host, config.grpc_port, "--grpc-port", credentials)
    api_keys = ApiKeys.from_config(config)  # a bad key file fails before the model loads
    model = load_model_info(config.model)
    served_name = config.served_model_name or model.name
    registry = WorkerRegistry(
        config.heartbeat_interval_s, config.heartbeat_timeout_s, config.cluster_secret
    )
    admission = Admission(config.max_waiting, config.queue_timeout_s, config.tenant_weight_map)
    registry.on_change(admission.notify)
    scheduler = ClusterScheduler(registry, admission, dispatch or DispatchConfig())
    metrics = Metrics(served_name)
    quotas = TenantQuotas(
        config.tenant_max_concurrent, config.tenant_max_rps, max_tpm=config.tenant_max_tpm
    )
    frontend = Frontend(
        Generator(scheduler, model, metrics, quotas),
        model,
        served_name,
        registry,
        admission,
        metrics,
        quotas,
    )

    pb_grpc.add_RegistryServicer_to_server(RegistryService(registry, model.name), control)
    control_health = ServerHealth(control, [REGISTRY_SERVICE])
    await control_health.start()
    await control.start()
    control_health.follow(lambda: True)  # registrations are welcome from the start
    kserve_grpc.add_to_server(inference, frontend, api_keys)
    inference_health = ServerHealth(inference, [INFERENCE_SERVICE])
    await inference_health.start()
    await inference.start()
    inference_health.follow(lambda: frontend.is_ready)

    app = tracing.traced_asgi(build_app(frontend, api_keys))
    http = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.http_port,
            log_level="warning",
            lifespan="off",
            **(tls.uvicorn_options() if tls else {}),
        )
    )
    http.install_signal_handlers = lambda: None  # we handle signals for both servers
    sweeper = asyncio.create_task(registry.run_sweeper())
    serving = asyncio.create_task(http.serve(sockets=[http_socket]))
    print(
        f"disagg coordinator: {'HTTPS' if tls else 'HTTP'} on {config.host}:{config.http_port}, "
        f"KServe gRPC{' over TLS' if tls else ''} on "
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
    await inference_health.stop()
    await control_health.stop()
    http.should_exit = True
    await serving
    sweeper.cancel()
    await inference.stop(grace=1.0)
    await control.stop(grace=1.0)


def main(config: CoordinatorConfig, dispatch: DispatchConfig | None = None) -> int:
    asyncio.run(run(config, dispatch))
    return 0
