"""A worker's side of the coordinator registry: register, then heartbeat until stopped.

A coordinator that restarts forgets its workers; a heartbeat answered with
`known=False` makes the worker register again, so the cluster heals itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from disagg.rpc import control_pb2 as pb
from disagg.rpc import control_pb2_grpc as pb_grpc
from disagg.rpc.cluster_secret import secret_metadata

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5.0


class WorkerRegistration:
    def __init__(
        self,
        coordinator: str,
        info: pb.WorkerInfo,
        status: Callable[[], pb.HeartbeatRequest],
        cluster_secret: str = "",
        on_reply: Callable[[pb.HeartbeatResponse], None] | None = None,
    ) -> None:
        """`on_reply` sees every heartbeat reply (a decode worker renews leases from it)."""
        self.coordinator = coordinator
        self.on_reply = on_reply
        self._metadata = secret_metadata(cluster_secret)
        self.info = info
        self.status = status
        self._channel = grpc.aio.insecure_channel(coordinator)
        self._stub = pb_grpc.RegistryStub(self._channel)
        self._task: asyncio.Task | None = None
        self.is_registered = False
        """The coordinator answered our last Register or Heartbeat knowing us (readiness)."""
        self.is_draining = False
        """Every heartbeat from now on says so (see disagg/rpc/drain.py)."""

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.close()

    async def leave_rotation(self) -> bool:
        """Report `draining` at once rather than at the next beat; False if the call failed."""
        self.is_draining = True
        try:
            await self._stub.Heartbeat(
                self._status(), timeout=RPC_TIMEOUT_S, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            log.warning("draining heartbeat to %s failed: %s", self.coordinator, error.code())
            return False
        return True

    def _status(self) -> pb.HeartbeatRequest:
        request = self.status()
        request.draining = self.is_draining
        return request

    async def _run(self) -> None:
        interval_s = await self._register()
        while True:
            await asyncio.sleep(interval_s)
            try:
                reply = await self._stub.Heartbeat(
                    self._status(), timeout=RPC_TIMEOUT_S, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as error:
                log.warning("heartbeat to %s failed: %s", self.coordinator, error.code())
                self.is_registered = False
                continue
            self.is_registered = reply.known
            if self.on_reply is not None:
                self.on_reply(reply)
            if not reply.known:
                interval_s = await self._register()

    async def _register(self) -> float:
        """Retry until the coordinator answers (it may start after us)."""
        while True:
            try:
                reply = await self._stub.Register(
                    self.info, timeout=RPC_TIMEOUT_S, metadata=self._metadata
                )
                self.is_registered = True
                log.info("registered %s with %s", self.info.worker_id, self.coordinator)
                return reply.heartbeat_interval_s or 1.0
            except grpc.aio.AioRpcError as error:
                log.info("coordinator %s not reachable yet (%s)", self.coordinator, error.code())
                await asyncio.sleep(0.5)
