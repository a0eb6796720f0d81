"""The cluster secret on the control plane: every gRPC call between the cluster's own processes
carries the secret in its metadata, and every server of the cluster (the coordinator's registry,
each worker's Allocate/Prefill/Decode/Free) refuses a call without it (UNAUTHENTICATED) before
its handler runs, so a process that can merely reach a port can neither join the cluster nor
allocate, prefill or decode. Health checks stay open for probes.

The comparison is constant-time (`hmac.compare_digest`). An empty secret turns the check off.
The same secret keys the MAC on KV frames (`disagg.kv.frame_mac`).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable

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
        # NOTE: only looks the handler up (its kind), the method itself never runs
        handler = await continuation(details)
        return _refusal(details.method, handler)


def server_interceptors(secret: str) -> list[grpc.aio.ServerInterceptor] | None:
    """What a cluster server installs: the check, or nothing when the cluster has no secret."""
    return [ClusterSecretInterceptor(secret)] if secret else None


def client_interceptors(secret: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add the secret to every call of a channel, whatever its kind."""
    if not secret:
        return []
    metadata = secret_metadata(secret)
    return [
        _UnaryUnarySecret(metadata),
        _UnaryStreamSecret(metadata),
        _StreamUnarySecret(metadata),
        _StreamStreamSecret(metadata),
    ]


class _AddsSecret:
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _with_secret(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def _call(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, object], Awaitable[object]],
        details: grpc.aio.ClientCallDetails,
        request: object,
    ) -> object:
        """request: the message, or for client-streaming calls the iterator of messages."""
        return await continuation(self._with_secret(details), request)


class _UnaryUnarySecret(_AddsSecret, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AddsSecret._call


class _UnaryStreamSecret(_AddsSecret, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AddsSecret._call


class _StreamUnarySecret(_AddsSecret, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AddsSecret._call


class _StreamStreamSecret(_AddsSecret, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AddsSecret._call


def _refusal(method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the refused method's own kind (unary or streaming) that only aborts."""
    message = f"{method} needs the cluster secret (--cluster-secret)"

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(
        request: object, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[object]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover -- makes this an async generator, as streaming handlers are

    is_streaming_in = handler is not None and handler.request_streaming
    is_streaming_out = handler is not None and handler.response_streaming
    if is_streaming_in and is_streaming_out:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    if is_streaming_in:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if is_streaming_out:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)
