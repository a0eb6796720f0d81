"""Calls addressed to one worker incarnation: a restarted worker refuses its previous life's.

The supervisor restarts a crashed worker under a new id (`decode-0-e2`, the epoch
in the suffix). The coordinator sends the id it believes it is talking to with
every call on a worker's channel (`addressed_to`, client interceptors); the
worker refuses a call addressed to any other id with FAILED_PRECONDITION
(`EpochInterceptor`), so a call meant for a dead incarnation can never act on
the new one, even when the new process took over the old address. A call that
names no worker (a probe, a tool, a test) is served.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

METADATA_KEY = "x-disagg-worker-id"
OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"


def addressed_worker(metadata: object) -> str | None:
    """The worker id a call's metadata names, or None."""
    return dict(metadata or ()).get(METADATA_KEY)


class EpochInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (FAILED_PRECONDITION) calls addressed to a worker id other than `worker_id`."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        addressed = addressed_worker(details.invocation_metadata)
        is_open = details.method.startswith(OPEN_METHOD_PREFIX)
        if handler is None or is_open or addressed in (None, self.worker_id):
            return handler
        return _refusal(handler, f"call for {addressed} reached {self.worker_id} (a stale epoch)")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts every call with `message`."""

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)

    async def refuse_stream(request: object, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        yield  # NOTE: unreachable; makes this an async generator, as a streaming handler is

    codecs = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.request_streaming:
        raise NotImplementedError("no worker method streams its requests")
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codecs)
    return grpc.unary_unary_rpc_method_handler(refuse, **codecs)


def addressed_to(worker_id: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add `worker_id` to every unary and server-streaming call's
    metadata. NOTE: two objects: grpc.aio files each interceptor under one call kind only."""
    return [_AddressUnary(worker_id), _AddressStream(worker_id)]


class _Addressed:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(METADATA_KEY, self.worker_id)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _AddressUnary(_Addressed, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _AddressStream(_Addressed, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)
