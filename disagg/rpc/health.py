"""The standard gRPC health service (`grpc.health.v1`) on a server, fed by its real readiness.

Kubernetes' native gRPC probes, `grpc_health_probe` and gRPC-aware load
balancers all ask `grpc.health.v1.Health/Check`. Each server answers two kinds
of question:

- the overall service `""` is *readiness*: SERVING only while the server can
  take work (a worker: its model is loaded and the coordinator has it
  registered; the coordinator: a prefill and a decode worker are registered),
  and NOT_SERVING from the moment it starts to stop;
- each named gRPC service on the server (`disagg.control.PrefillWorker`,
  `inference.GRPCInferenceService`, ...) is *liveness*: SERVING from start until
  the process begins to stop, whatever the rest of the cluster is doing, so a
  liveness probe never restarts a worker because the coordinator is away.

Readiness is polled from a callable rather than pushed, so the roles need no
knowledge of health checking: they expose a boolean and this module follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from disagg.rpc import control_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = ""
"""The overall service name, by the protocol's convention."""

_CONTROL = control_pb2.DESCRIPTOR.services_by_name
ROLE_SERVICES: dict[str, tuple[str, ...]] = {
    "prefill": (_CONTROL["PrefillWorker"].full_name,),
    "decode": (_CONTROL["DecodeWorker"].full_name,),
    "colocated": (_CONTROL["DecodeWorker"].full_name, _CONTROL["PrefillWorker"].full_name),
}
"""The gRPC services each worker role serves, named as health checks name them."""
REGISTRY_SERVICE = _CONTROL["Registry"].full_name
# NOTE: written out, not read from grpc_predict_v2_pb2: importing those messages here would
# clash with tritonclient's copy of package `inference` in a process that holds both.
INFERENCE_SERVICE = "inference.GRPCInferenceService"


class ServerHealth:
    """`grpc.health.v1.Health` on one grpc.aio server.

    Create it and `await start()` before `server.start()`, so the server never
    answers SERVING before it is ready; then `follow(is_ready)`.
    """

    def __init__(self, server: grpc.aio.Server, service_names: Iterable[str]) -> None:
        self.servicer = health_aio.HealthServicer()
        self.service_names = tuple(service_names)
        self._follower: asyncio.Task | None = None
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Named services (liveness) SERVING, readiness NOT_SERVING until `follow` says so."""
        await self.servicer.set(READINESS, NOT_SERVING)
        for name in self.service_names:
            await self.servicer.set(name, SERVING)

    def follow(self, is_ready: Callable[[], bool], poll_interval_s: float = 0.25) -> None:
        """Readiness tracks `is_ready()`, read every `poll_interval_s`, until `stop`."""
        self._follower = asyncio.create_task(self._follow(is_ready, poll_interval_s))

    async def stop(self) -> None:
        """Everything NOT_SERVING for good: call it first when shutting down, so probes and
        load balancers stop sending work while in-flight calls finish."""
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self.servicer.enter_graceful_shutdown()

    async def _follow(self, is_ready: Callable[[], bool], poll_interval_s: float) -> None:
        was_ready = None
        while True:
            now_ready = bool(is_ready())
            if now_ready != was_ready:
                await self.servicer.set(READINESS, SERVING if now_ready else NOT_SERVING)
                was_ready = now_ready
            await asyncio.sleep(poll_interval_s)
