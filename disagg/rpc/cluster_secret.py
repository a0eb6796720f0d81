"""The cluster secret on the control plane: a worker proves it belongs to the cluster by
sending the secret in gRPC metadata with every registry call, and the coordinator's control
server refuses any call without it (UNAUTHENTICATED), so a process that can merely reach the
control port cannot join the cluster. Health checks stay open for probes.

The comparison is constant-time (`hmac.compare_digest`). An empty secret turns the check off.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

METADATA_KEY = "x-disagg-cluster-secret"
OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"


def secret_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """What a client sends: nothing when the cluster has no secret."""
    return ((METADATA_KEY, secret),) if secret else ()


def has_secret(metadata: object, secret: str) -> bool:
    presented = dict(metadata or ()).get(METADATA_KEY, "")
    return hmac.compare_digest(str(presented).encode(), secret.encode())


class ClusterSecretInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks unless its metadata carries the secret."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        is_open = details.method.startswith(OPEN_METHOD_PREFIX)
        if is_open or has_secret(details.invocation_metadata, self.secret):
            return await continuation(details)
        return _refusal(details.method)


def _refusal(method: str) -> grpc.RpcMethodHandler:
    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, f"{method} needs the cluster secret (--cluster-secret)"
        )

    return grpc.unary_unary_rpc_method_handler(refuse)
